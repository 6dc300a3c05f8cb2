"""Quotas: the GCRA token bucket, per-tenant limits, and the shared SQL ledger (two ledgers on
one SQLite file stand for two gateway replicas)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from conveyor.quota import (
    MemoryRateLedger,
    QuotaSettings,
    SqlRateLedger,
    TenantQuota,
    gcra,
    retry_after_header,
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_bucket_lets_a_burst_through_then_paces_at_the_rate() -> None:
    tat, now = 0.0, 100.0
    allowed = 0
    for _ in range(10):
        decision, tat = gcra(tat, now, rate=2.0, burst=4)
        allowed += decision.allowed
    assert allowed == 4
    decision, _ = gcra(tat, now, rate=2.0, burst=4)
    assert not decision.allowed and decision.retry_after_s == pytest.approx(0.5)
    decision, tat = gcra(tat, now + 0.5, rate=2.0, burst=4)
    assert decision.allowed  # one more after 1/rate seconds


def test_a_refused_check_does_not_use_up_the_bucket() -> None:
    decision, tat = gcra(0.0, 10.0, rate=1.0, burst=1)
    assert decision.allowed
    for _ in range(5):
        refused, same = gcra(tat, 10.0, rate=1.0, burst=1)
        assert not refused.allowed and same == tat


def test_rate_zero_is_unlimited() -> None:
    decision, tat = gcra(0.0, 1.0, rate=0.0, burst=1)
    assert decision.allowed and tat == 0.0


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert retry_after_header(gcra(1e9, 0.0, 1.0, 1)[0]) == str(int(1e9))
    ledger = MemoryRateLedger(Clock())
    quota = TenantQuota(rate=10.0, burst=1)
    ledger.take("a", quota)
    assert retry_after_header(ledger.take("a", quota)) == "1"


def test_settings_give_each_tenant_its_limits_or_the_defaults() -> None:
    settings = QuotaSettings(
        quota_rate=5.0, quota_burst=10, tenant_quotas={"big": TenantQuota(rate=50, burst=100)}
    )
    assert settings.of("big").rate == 50
    assert settings.of("other") == TenantQuota(rate=5.0, burst=10, in_flight=0)


def test_the_environment_names_per_tenant_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_TENANT_QUOTAS", '{"acme": {"rate": 2, "burst": 3}}')
    assert QuotaSettings().of("acme") == TenantQuota(rate=2, burst=3)


def test_tenants_have_separate_buckets() -> None:
    ledger = MemoryRateLedger(Clock())
    quota = TenantQuota(rate=1.0, burst=2)
    assert [ledger.take("a", quota).allowed for _ in range(3)] == [True, True, False]
    assert ledger.take("b", quota).allowed


class LedgerContract:
    """The shared SQL ledger, written once over the store's dialect: two ledgers on one database
    stand for two gateway replicas. Runs here on a SQLite file and in
    tests/integration/test_quota_postgres.py on the throwaway PostgreSQL; subclasses provide
    `ledger_url`."""

    def test_two_replicas_share_each_tenants_bucket(self, ledger_url: str) -> None:
        clock = Clock()
        first, second = SqlRateLedger(ledger_url, clock), SqlRateLedger(ledger_url, clock)
        quota = TenantQuota(rate=1.0, burst=3)
        tenant = f"t-{uuid.uuid4().hex[:8]}"  # a server's database is shared by the session
        try:
            answers = [ledger.take(tenant, quota).allowed for ledger in (first, second) * 3]
            assert answers == [True, True, True, False, False, False]  # 3 in all, not 3 each
            assert first.take(tenant, quota).retry_after_s > 0
            clock.now += 1.0
            assert second.take(tenant, quota).allowed and not first.take(tenant, quota).allowed
            assert first.take("other", TenantQuota(rate=0, burst=1)).allowed  # 0: no limit
        finally:
            first.close()
            second.close()


class TestSqliteLedger(LedgerContract):
    @pytest.fixture
    def ledger_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'conveyor.db'}"


def test_the_sql_ledger_refuses_an_unknown_url() -> None:
    with pytest.raises(ValueError):
        SqlRateLedger("mysql://x")
