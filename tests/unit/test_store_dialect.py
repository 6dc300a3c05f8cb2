"""The dialect seam of the result store (`conveyor.store.dialect`): what each dialect says.

The store's behaviour is the contract in test_store.py (run on both backends); these tests pin
the dialects' own small parts: every shared statement is built with one placeholder style only,
times round-trip as aware UTC, and a PostgreSQL URL never shows in a repr. Neither needs a
server: `PostgresDialect` connects on its first transaction.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import astuple
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from conveyor.store import open_dialect
from conveyor.store.batches import batch_sql, set_status_sql
from conveyor.store.dialect import Dialect
from conveyor.store.lifecycle import lifecycle_sql
from conveyor.store.postgres import PostgresDialect
from conveyor.store.sqlite import SqliteDialect
from conveyor.store.statements import store_sql
from conveyor.store.variantruns import run_upsert

_PG_URL = "postgresql://conveyor:s3cret-pw@127.0.0.1:1/results"


@pytest.fixture(params=["sqlite", "postgresql"])
def dialect(request: pytest.FixtureRequest) -> Iterator[Dialect]:
    opened = open_dialect("sqlite:///:memory:" if request.param == "sqlite" else _PG_URL)
    yield opened
    opened.close()


def _statements(d: Dialect) -> list[str]:
    return [
        *astuple(store_sql(d)),
        *astuple(batch_sql(d.p)),
        *astuple(lifecycle_sql(d.p)),
        run_upsert(d.p),
        set_status_sql(d.p, 3),
    ]


def test_every_shared_statement_uses_the_dialects_placeholder_only(dialect: Dialect) -> None:
    for statement in _statements(dialect):
        if dialect.p == "?":
            assert "%" not in statement, statement
        else:  # psycopg reads every % as the start of a placeholder
            assert "?" not in statement, statement
            assert not re.search(r"%(?!s)", statement), statement
        assert dialect.p in statement or statement.startswith("SELECT status, COUNT(*)")


def test_both_dialects_build_the_same_statements_but_for_their_own_parts() -> None:
    sqlite, postgres = SqliteDialect(":memory:"), PostgresDialect(_PG_URL)
    try:
        for ours, theirs in zip(_statements(sqlite), _statements(postgres), strict=True):
            same = ours.replace("?", "%s").replace("rowid", "seq")
            assert same == theirs.replace(postgres.for_update, ""), (ours, theirs)
    finally:
        sqlite.close()


def test_times_round_trip_as_aware_utc(dialect: Dialect) -> None:
    local = datetime(2024, 5, 1, 14, 0, 0, 1, tzinfo=timezone(timedelta(hours=2)))
    stored = dialect.stamp(local)
    back = dialect.time(stored)
    assert back == local and back is not None and back.tzinfo == UTC
    assert dialect.stamp(None) is None and dialect.time(None) is None


def test_sqlite_times_are_fixed_width_text_so_text_order_is_time_order() -> None:
    d = SqliteDialect(":memory:")
    try:
        early = d.stamp(datetime(2024, 5, 1, 12, 0, tzinfo=UTC))
        late = d.stamp(datetime(2024, 5, 1, 12, 0, 0, 500, tzinfo=UTC))
        assert early == "2024-05-01T12:00:00.000000+00:00"
        assert isinstance(late, str) and len(late) == len(early) == 32
        assert early < late
    finally:
        d.close()


def test_postgres_dialect_never_shows_its_url() -> None:
    d = PostgresDialect(_PG_URL)
    assert "s3cret" not in repr(d) and "conveyor" not in repr(d)


def test_sqlite_dialect_lists_a_tables_columns() -> None:
    # PostgreSQL's listing needs a server: the migration contract uses it there.
    d = SqliteDialect(":memory:")
    try:
        with d.transaction() as cur:
            assert d.columns(cur, "nothing_here") == set()
            cur.execute("CREATE TABLE t (a TEXT, b INTEGER)")
            assert d.columns(cur, "t") == {"a", "b"}
    finally:
        d.close()


def test_a_second_store_in_one_process_keeps_the_first_ones_writes_durable(tmp_path: Path) -> None:
    # writeback opens the store and, beside it, the retention sweeper's; the gateway its store
    # and the quota ledger. Opening the second must not strip the first connection's POSIX
    # locks: another process closing the database would then delete the write-ahead log the
    # first connection still writes to, and its later commits would be lost to every reader.
    import subprocess
    import sys

    from conveyor.store import TaskUpdate, open_store

    path = tmp_path / "two.db"
    url = f"sqlite:///{path}"
    count = (
        "import sys; from conveyor.store import open_store; s = open_store(sys.argv[1]); "
        "print(sum(s.count_by_status().values())); s.close()"
    )

    def other_process_count() -> int:
        out = subprocess.run(
            [sys.executable, "-c", count, url], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    def failed(task_id: str) -> TaskUpdate:
        return TaskUpdate(
            task_id=task_id,
            event_id=f"event-{task_id}",
            event_type="conveyor.task.status.v1",
            status="failed",
            time=datetime.now(UTC),
            stage="preprocess",
            error="DecodeError: test",
        )

    first = open_store(url)
    try:
        first.apply(failed("t-1"))
        open_store(url).close()  # the second store of this process
        assert other_process_count() == 1  # that process's close must not end the WAL
        first.apply(failed("t-2"))
        assert other_process_count() == 2
    finally:
        first.close()
    assert other_process_count() == 2
