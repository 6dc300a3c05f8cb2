"""The batch store contract (tests/unit/test_batch_store.py) against a real PostgreSQL server."""

from __future__ import annotations

import pytest

from tests.unit.test_batch_store import BatchStoreContract  # written once, there

pytestmark = pytest.mark.postgres


class TestPostgresBatchStore(BatchStoreContract):
    @pytest.fixture
    def store_url(self, postgres_url: str) -> str:
        return postgres_url  # batch ids are random: tests never share rows
