"""The gateway's submission quota: 429 with Retry-After over a tenant's rate, other tenants
unaffected, and the bucket shared by two gateway replicas on one database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from conveyor.quota import QuotaSettings, SqlRateLedger, SubmissionQuota, TenantQuota
from conveyor.services.gateway.handler import Gateway, build_app
from conveyor.services.gateway.settings import GatewaySettings
from conveyor.store import TaskUpdate, open_store
from tests.unit.test_gateway import FakePublisher

TOKENS = {"tok-acme": "acme", "tok-beta": "beta", "tok-gamma": "gamma"}


def replica(db: Path, publisher: FakePublisher) -> TestClient:
    url = f"sqlite:///{db}"
    settings = GatewaySettings(gateway_tokens=TOKENS, store_url=url)
    store = open_store(url)
    quota = SubmissionQuota(
        QuotaSettings(
            tenant_quotas={
                "acme": TenantQuota(rate=0.01, burst=3),
                "beta": TenantQuota(rate=1000, burst=1000, in_flight=2),
            }
        ),
        SqlRateLedger(url),
        unfinished=store.count_unfinished,
    )
    gateway = Gateway(
        settings,
        publisher=publisher,
        store=store,
        queue_estimate=lambda: 0,
        closers=(quota.close,),
        quota=quota,
    )
    return TestClient(build_app(gateway))


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[TestClient, TestClient, FakePublisher]]:
    publisher = FakePublisher()
    db = tmp_path / "conveyor.db"
    with replica(db, publisher) as first, replica(db, publisher) as second:
        yield first, second, publisher


def post(client: TestClient, token: str, n: int) -> int:
    return client.post(
        "/v1/tasks",
        json={"kind": "embed", "input": f"text {n}"},
        headers={"Authorization": f"Bearer {token}"},
    ).status_code


def rejections(tenant: str, limit: str = "rate") -> float:
    value = REGISTRY.get_sample_value(
        "conveyor_quota_rejections_total", {"tenant": tenant, "limit": limit}
    )
    return value or 0.0


def test_a_tenant_over_its_rate_gets_429_with_retry_after(
    replicas: tuple[TestClient, TestClient, FakePublisher],
) -> None:
    first, _second, publisher = replicas
    before = rejections("acme")
    assert [post(first, "tok-acme", i) for i in range(3)] == [202, 202, 202]
    refused = first.post(
        "/v1/tasks",
        json={"kind": "embed", "input": "x"},
        headers={"Authorization": "Bearer tok-acme"},
    )
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert "submission rate" in refused.json()["error"]
    assert len(publisher.sent) == 3  # the refused task was not published
    assert rejections("acme") == before + 1
    assert post(first, "tok-gamma", 0) == 202  # another tenant has its own bucket


def test_two_gateway_replicas_share_a_tenants_bucket(
    replicas: tuple[TestClient, TestClient, FakePublisher],
) -> None:
    first, second, publisher = replicas
    codes = [post(client, "tok-acme", i) for i, client in enumerate([first, second] * 3)]
    assert codes == [202, 202, 202, 429, 429, 429]
    assert len(publisher.sent) == 3


def test_tasks_in_flight_are_counted_in_the_store_across_replicas(
    replicas: tuple[TestClient, TestClient, FakePublisher],
) -> None:
    first, second, publisher = replicas
    before = rejections("beta", "in_flight")
    assert [post(first, "tok-beta", 0), post(second, "tok-beta", 1)] == [202, 202]
    refused = first.post(
        "/v1/tasks",
        json={"kind": "embed", "input": "x"},
        headers={"Authorization": "Bearer tok-beta"},
    )
    assert refused.status_code == 429
    assert "2 tasks in flight" in refused.json()["error"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert post(second, "tok-beta", 2) == 429  # the other replica reads the same rows
    assert rejections("beta", "in_flight") == before + 2
    assert post(first, "tok-gamma", 0) == 202  # another tenant's tasks do not count
    task_id = publisher.sent[0]["task_id"]
    store = first.app.state.gateway.store
    store.apply(
        TaskUpdate(
            task_id=task_id,
            event_id="done",
            event_type="conveyor.task.status.v1",
            status="completed",
            time=datetime.now(UTC),
            tenant="beta",
        )
    )
    assert post(second, "tok-beta", 3) == 202  # one finished: room for one more
    assert post(first, "tok-beta", 4) == 429
