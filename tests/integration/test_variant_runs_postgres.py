"""The `variant_runs` contract (tests/unit/test_variant_runs_store.py) on a real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest

from conveyor.store import open_store
from tests.unit.test_variant_runs_store import VariantRunContract

pytestmark = pytest.mark.postgres


class TestPostgresVariantRuns(VariantRunContract):
    @pytest.fixture
    def store_url(self, postgres_url: str) -> str:
        open_store(postgres_url).close()  # creates the schema on first use
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute("TRUNCATE variant_runs")
        return postgres_url
