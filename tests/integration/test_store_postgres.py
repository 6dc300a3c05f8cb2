"""The result store contract (tests/unit/test_store.py) against a real PostgreSQL server.

Also what only a server can show: a connection killed under the store raises `RetryableError`
and the next call reconnects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from conveyor.errors import RetryableError
from conveyor.store import ResultStore, TaskUpdate, open_store
from tests.unit.test_store import SharedStoreContract  # the contract is written once, there

pytestmark = pytest.mark.postgres


@pytest.fixture
def clean_postgres(postgres_url: str) -> str:
    """The session database, emptied: each test starts from no rows."""
    open_store(postgres_url).close()  # creates the schema on first use
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("TRUNCATE tasks, task_events, notifications")
    return postgres_url


class TestPostgresStore(SharedStoreContract):
    @pytest.fixture
    def store_url(self, clean_postgres: str) -> str:
        return clean_postgres


@pytest.fixture
def store(clean_postgres: str) -> Iterator[ResultStore]:
    opened = open_store(clean_postgres)
    yield opened
    opened.close()


def test_killed_connection_is_retryable_then_reconnects(
    store: ResultStore, clean_postgres: str
) -> None:
    event = TaskUpdate("t1", "e1", "x", "pending", datetime(2024, 1, 1, tzinfo=UTC))
    assert store.count_by_status()["pending"] == 0  # connection established
    with psycopg.connect(clean_postgres, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'conveyor' AND pid <> pg_backend_pid()"
        ).fetchall()
    assert killed and all(row[0] for row in killed)
    with pytest.raises(RetryableError):
        store.apply(event)
    assert store.apply(event) is True  # the retry reconnects and applies once
    assert store.apply(event) is False


def test_schema_creation_is_idempotent(clean_postgres: str) -> None:
    stores = [open_store(clean_postgres) for _ in range(3)]
    for opened in stores:
        opened.close()


_V1_SCHEMA = (
    "CREATE TABLE tasks (task_id text PRIMARY KEY, status text NOT NULL, "
    "created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, tenant text, kind text, "
    "stage text, result text, verdict text CHECK (verdict IN ('allow', 'flag', 'block')), "
    "moderation text, trace_id text, error text, callback_url text, completed_at timestamptz)",
    "CREATE INDEX tasks_status_idx ON tasks (status)",
    "CREATE TABLE task_events (event_id text PRIMARY KEY, task_id text NOT NULL, "
    "type text NOT NULL, status text NOT NULL, time timestamptz NOT NULL, stage text, "
    "detail text, seq bigint GENERATED ALWAYS AS IDENTITY)",
    "CREATE INDEX task_events_task_time_idx ON task_events (task_id, time, seq)",
    "CREATE TABLE notifications (task_id text PRIMARY KEY, event_id text NOT NULL, "
    "status text NOT NULL, url text NOT NULL, claimed_at timestamptz NOT NULL, "
    "http_status integer, delivered_at timestamptz)",
    "INSERT INTO tasks VALUES ('t1', 'completed', '2024-05-01T12:00:00Z', "
    "'2024-05-01T12:00:05Z', 'acme', 'embed', 'writeback', '{\"x\":1}', NULL, NULL, NULL, NULL, "
    "'https://cb', '2024-05-01T12:00:05Z')",
    "INSERT INTO tasks (task_id, status, created_at, updated_at) "
    "VALUES ('t2', 'processing', '2024-05-01T12:00:00Z', '2024-05-01T12:00:00Z')",
    "INSERT INTO task_events (event_id, task_id, type, status, time) "
    "VALUES ('e1', 't1', 'x', 'processing', '2024-05-01T12:00:05Z'), "
    "('e2', 't1', 'x', 'completed', '2024-05-01T12:00:05Z'), "
    "('e3', 't2', 'x', 'processing', '2024-05-01T12:00:00Z')",
    "INSERT INTO notifications VALUES ('t1', 'e2', 'delivered', 'https://cb', "
    "'2024-05-01T12:00:06Z', 204, '2024-05-01T12:00:07Z')",
)


def test_database_of_the_global_id_layout_is_migrated(postgres_url: str) -> None:
    # A database written before ids were per tenant: rows keep their data under their tenant,
    # timeline ties keep their arrival order, and a second open finds the new layout.
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS tasks, task_events, notifications")
        for statement in _V1_SCHEMA:
            conn.execute(statement)
    store = open_store(postgres_url)
    try:
        t1 = store.get("t1", tenant="acme")
        assert t1 is not None and (t1.status, t1.result, t1.callback_url) == (
            "completed",
            {"x": 1},
            "https://cb",
        )
        assert [e.event_id for e in store.timeline("t1", tenant="acme")] == ["e1", "e2"]
        t2 = store.get("t2")
        assert t2 is not None and t2.tenant is None
        notice = store.notification("t1", tenant="acme")
        assert notice is not None and (notice.status, notice.tenant) == ("delivered", "acme")
        assert store.reserve("t1", "globex", time=datetime.now(UTC), digest="d").new
        event = TaskUpdate("t1", "e2", "x", "completed", datetime(2024, 5, 1, tzinfo=UTC))
        assert store.apply(dataclasses.replace(event, tenant="acme")) is False
    finally:
        store.close()
    open_store(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_name LIKE %s",
            ("%_v1",),
        ).fetchall()
        assert tables == []
        conn.execute("TRUNCATE tasks, task_events, notifications")
