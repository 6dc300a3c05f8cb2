"""The batch store contract (tests/unit/test_batch_store.py) against a real PostgreSQL server."""

from __future__ import annotations

import secrets

import psycopg
import pytest
from psycopg import sql

from tests.unit.test_batch_store import BatchStoreContract, DispatchContract  # written once

pytestmark = pytest.mark.postgres


class TestPostgresBatchStore(BatchStoreContract):
    @pytest.fixture
    def store_url(self, postgres_url: str) -> str:
        return postgres_url  # batch ids are random: tests never share rows


class TestPostgresDispatch(DispatchContract):
    @pytest.fixture
    def store_url(self, postgres_url: str) -> str:
        """A database of the test's own: the dispatch window counts every batch in it."""
        name = f"dispatch_{secrets.token_hex(6)}"
        with psycopg.connect(postgres_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        base, _, _ = postgres_url.rpartition("/")
        return f"{base}/{name}"
