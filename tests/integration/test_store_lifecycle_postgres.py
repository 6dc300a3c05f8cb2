"""Retention and result reuse (tests/unit/test_store_lifecycle.py) on a real PostgreSQL server."""

from __future__ import annotations

import psycopg
import pytest

from conveyor.store import open_store
from tests.unit.test_store_lifecycle import LifecycleContract

pytestmark = pytest.mark.postgres


@pytest.fixture
def clean_postgres(postgres_url: str) -> str:
    """The session database, emptied: each test starts from no rows."""
    open_store(postgres_url).close()  # creates the schema on first use
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("TRUNCATE tasks, task_events, notifications, reuse_entries")
    return postgres_url


class TestPostgresLifecycle(LifecycleContract):
    @pytest.fixture
    def store_url(self, clean_postgres: str) -> str:
        return clean_postgres
