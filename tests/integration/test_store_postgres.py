"""The result store contract (tests/unit/test_store.py) against a real PostgreSQL server.

Also what only a server can show: a connection killed under the store raises `RetryableError`
and the next call reconnects.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from conveyor.errors import RetryableError
from conveyor.store import ResultStore, TaskUpdate, open_store
from tests.unit.test_store import (  # the contracts are written once, there
    V1_ROWS,
    MigrationContract,
    SharedStoreContract,
)

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


V1_POSTGRES = (
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
)


class TestPostgresMigration(MigrationContract):
    @pytest.fixture
    def v1_url(self, postgres_url: str) -> Iterator[str]:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS tasks, task_events, notifications")
            for statement in (*V1_POSTGRES, *V1_ROWS):
                conn.execute(statement)
        yield postgres_url
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("TRUNCATE tasks, task_events, notifications")
