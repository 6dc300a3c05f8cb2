"""The quota ledger on the suite's throwaway PostgreSQL: two gateway replicas' ledgers share
each tenant's bucket (SELECT ... FOR UPDATE in one transaction per check)."""

from __future__ import annotations

from conveyor.quota import SqlRateLedger, TenantQuota


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def test_two_replicas_on_postgres_share_a_tenants_bucket(postgres_url: str) -> None:
    clock = Clock()
    first, second = SqlRateLedger(postgres_url, clock), SqlRateLedger(postgres_url, clock)
    quota = TenantQuota(rate=1.0, burst=2)
    tenant = f"pg-{id(clock)}"
    try:
        answers = [ledger.take(tenant, quota).allowed for ledger in (first, second) * 2]
        assert answers == [True, True, False, False]
        refused = first.take(tenant, quota)
        assert refused.retry_after_s > 0
        clock.now += 1.0
        assert second.take(tenant, quota).allowed
        assert not first.take(tenant, quota).allowed
    finally:
        first.close()
        second.close()
