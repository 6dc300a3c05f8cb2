"""Admission control: records ahead per lane, the recent service rate, the estimated start,
and the gateway refusing (429) a task whose deadline would pass before it starts."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from conveyor.admission import (
    INGRESS,
    Admission,
    Snapshot,
    ahead_of,
    decide,
    service_rate,
)
from conveyor.errors import BrokerError
from conveyor.services.gateway.handler import Gateway, build_app
from conveyor.services.gateway.settings import GatewaySettings
from conveyor.store import TaskUpdate, open_store
from conveyor.web.schema import openapi_document
from tests.unit.test_gateway import FakePublisher

NOW = datetime(2026, 12, 2, 7, 0, tzinfo=UTC)


def snap(at: float, served: int, **waiting: int) -> Snapshot:
    return Snapshot(at, {k.replace("ingress", INGRESS): v for k, v in waiting.items()}, served)


def test_a_task_waits_behind_the_ingress_and_its_lane_and_every_higher_lane() -> None:
    s = snap(0, 0, ingress=5, high=10, normal=100, low=1000)
    assert ahead_of(s, "high") == 15
    assert ahead_of(s, "normal") == 115
    assert ahead_of(s, "low") == 1115
    assert ahead_of(s, "unknown") == 115  # the default lane


def test_the_service_rate_is_what_was_served_over_the_window() -> None:
    assert service_rate([snap(0, 100)]) is None
    assert service_rate([snap(0, 100), snap(10, 100)]) is None  # nothing served: unknown
    assert service_rate([snap(0, 100), snap(5, 150), snap(10, 300)]) == pytest.approx(20.0)


def test_a_deadline_before_the_estimated_start_is_refused() -> None:
    verdict = decide(200, 10.0, NOW + timedelta(seconds=5), NOW)
    assert not verdict.allowed and verdict.wait_s == pytest.approx(20.0)
    assert verdict.start == NOW + timedelta(seconds=20)
    assert decide(200, 10.0, NOW + timedelta(seconds=30), NOW).allowed
    assert decide(200, 10.0, None, NOW).allowed  # no deadline: always admitted


def test_an_unknown_rate_admits_and_an_empty_queue_starts_now() -> None:
    unknown = decide(500, None, NOW + timedelta(seconds=1), NOW)
    assert unknown.allowed and unknown.start is None
    assert decide(0, None, NOW + timedelta(seconds=1), NOW).start == NOW


class Probe:
    def __init__(self, snapshots: list[Snapshot]) -> None:
        self.snapshots = snapshots
        self.calls = 0

    def __call__(self) -> Snapshot:
        self.calls += 1
        if not self.snapshots:
            raise BrokerError("down")
        return self.snapshots.pop(0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_admission_probes_once_per_interval_and_keeps_a_window_of_history() -> None:
    clock = Clock()
    probe = Probe([snap(0, 0, normal=100), snap(5, 50, normal=100), snap(70, 700, normal=100)])
    admission = Admission(probe, ttl_s=5.0, window_s=60.0, clock=clock)
    assert admission.check("normal", None, NOW).wait_s is None  # one snapshot: no rate yet
    admission.check("normal", None, NOW)
    assert probe.calls == 1  # cached within the interval
    clock.now = 5.0
    assert admission.check("normal", None, NOW).wait_s == pytest.approx(10.0)  # 10/s
    clock.now = 70.0
    admission.check("normal", None, NOW)
    assert [s.at for s in admission.history] == [5, 70]  # older than the window: dropped
    clock.now = 80.0
    assert admission.check("normal", None, NOW).allowed  # a failed probe keeps the last figures


@pytest.fixture
def gateway_client(tmp_path: Path) -> Iterator[TestClient]:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    clock = Clock()
    probe = Probe([snap(0, 0, normal=300), snap(5, 50, normal=300)])  # 10/s: 30 s ahead
    admission = Admission(probe, ttl_s=5.0, clock=clock)
    admission.check("normal", None, NOW)
    clock.now = 5.0
    gateway = Gateway(
        GatewaySettings(gateway_tokens={"tok": "acme"}, store_url=url),
        publisher=FakePublisher(),
        store=open_store(url),
        queue_estimate=lambda: 0,
        admission=admission,
    )
    with TestClient(build_app(gateway)) as client:
        yield client


def test_the_gateway_refuses_a_task_that_would_expire_in_the_queue(
    gateway_client: TestClient,
) -> None:
    soon = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
    refused = gateway_client.post(
        "/v1/tasks",
        json={"kind": "embed", "input": "x", "deadline": soon},
        headers={"Authorization": "Bearer tok"},
    )
    assert refused.status_code == 429
    assert "deadline would pass" in refused.json()["error"]
    assert int(refused.headers["Retry-After"]) == 30
    later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    accepted = gateway_client.post(
        "/v1/tasks",
        json={"kind": "embed", "input": "x", "deadline": later},
        headers={"Authorization": "Bearer tok"},
    )
    assert accepted.status_code == 202
    body = accepted.json()
    assert body["queue_position_estimate"] == 300
    start = datetime.fromisoformat(body["estimated_start"])
    assert timedelta(seconds=25) < start - datetime.now(UTC) <= timedelta(seconds=31)


def test_a_queued_task_shows_its_estimated_start_and_a_started_one_does_not(
    gateway_client: TestClient,
) -> None:
    auth = {"Authorization": "Bearer tok"}
    body = {"kind": "embed", "input": "x", "task_id": "q1", "priority": "high"}
    assert gateway_client.post("/v1/tasks", json=body, headers=auth).status_code == 202
    queued = gateway_client.get("/v1/tasks/q1", headers=auth).json()
    assert queued["status"] == "pending"
    assert queued["estimated_start"] is not None  # 0 ahead in the high lane: it starts now
    assert datetime.fromisoformat(queued["estimated_start"]) - datetime.now(UTC) < timedelta(
        seconds=2
    )
    body = {"kind": "embed", "input": "y", "task_id": "q2"}  # normal lane: 300 ahead at 10/s
    assert gateway_client.post("/v1/tasks", json=body, headers=auth).status_code == 202
    start = gateway_client.get("/v1/tasks/q2", headers=auth).json()["estimated_start"]
    assert timedelta(seconds=25) < datetime.fromisoformat(start) - datetime.now(UTC)
    store = gateway_client.app.state.gateway.store

    def step(stage: str, event_type: str) -> dict[str, Any]:
        update = TaskUpdate(
            task_id="q2",
            event_id=f"e-{stage}",
            event_type=event_type,
            status="processing",
            time=datetime.now(UTC),
            stage=stage,
            tenant="acme",
        )
        store.apply(update)
        view: dict[str, Any] = gateway_client.get("/v1/tasks/q2", headers=auth).json()
        return view

    waiting = step("preprocess", "conveyor.task.preprocessed.v1")  # queued in its lane
    assert waiting["estimated_start"] is not None
    started = step("inference", "conveyor.task.inferred.v1")
    assert (started["status"], started["estimated_start"]) == ("processing", None)


def test_the_openapi_document_lists_the_estimated_start_and_the_429() -> None:
    doc = openapi_document()
    schemas = doc["components"]["schemas"]
    assert "estimated_start" in schemas["Task"]["properties"]
    assert "estimated_start" in schemas["TaskAccepted"]["properties"]
    refused = doc["paths"]["/v1/tasks"]["post"]["responses"]["429"]
    assert "Retry-After" in refused["headers"]


def test_the_estimated_wait_per_lane_is_exported() -> None:
    clock = Clock()
    probe = Probe([snap(0, 0, high=0, normal=100, low=300), snap(10, 100, normal=100, low=300)])
    admission = Admission(probe, ttl_s=5.0, clock=clock)
    admission.check("normal", None, NOW)
    unknown = REGISTRY.get_sample_value("conveyor_lane_estimated_wait_seconds", {"lane": "low"})
    assert unknown is not None and math.isnan(unknown)
    clock.now = 10.0
    admission.check("normal", None, NOW)
    wait = {
        lane: REGISTRY.get_sample_value("conveyor_lane_estimated_wait_seconds", {"lane": lane})
        for lane in ("high", "normal", "low")
    }
    assert wait == {"high": 0.0, "normal": pytest.approx(10.0), "low": pytest.approx(40.0)}
