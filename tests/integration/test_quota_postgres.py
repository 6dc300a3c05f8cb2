"""The quota ledger contract (tests/unit/test_quota.py) on the suite's throwaway PostgreSQL: two
gateway replicas' ledgers share each tenant's bucket (SELECT ... FOR UPDATE in one transaction
per check)."""

from __future__ import annotations

import pytest

from tests.unit.test_quota import LedgerContract  # written once, there

pytestmark = pytest.mark.postgres


class TestPostgresLedger(LedgerContract):
    @pytest.fixture
    def ledger_url(self, postgres_url: str) -> str:
        return postgres_url
