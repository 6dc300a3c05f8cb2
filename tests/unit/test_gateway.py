"""The gateway's routes with a fake publisher and a real (in-memory SQLite) result store: auth,
validation, tenant isolation, status and timeline shape, WebSocket pushes, metrics, OpenAPI."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from starlette.testclient import TestClient, WebSocketDenialResponse

from conveyor.client import normalise_request
from conveyor.errors import BrokerError, PermanentError
from conveyor.services.gateway.handler import Gateway, build_app
from conveyor.services.gateway.settings import GatewaySettings
from conveyor.store import ResultStore, TaskUpdate, open_store
from conveyor.web.auth import token_subprotocol

# Every test here is fast; the bound only turns a hung WebSocket receive into a failure.
pytestmark = pytest.mark.timeout(60)

ACME = {"Authorization": "Bearer tok-acme"}
BETA = {"Authorization": "Bearer tok-beta"}
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


class FakePublisher:
    """Validates like TaskClient, records what it would have sent, or fails like a broker."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.failure: Exception | None = None
        self.started = self.closed = False

    def start(self) -> None:
        self.started = True

    async def submit(self, task: Mapping[str, Any]) -> tuple[str, str | None]:
        if self.failure:
            raise self.failure
        data = normalise_request(task)
        self.sent.append(data)
        return data["task_id"], TRACE

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def store() -> Iterator[ResultStore]:
    store = open_store("sqlite:///:memory:")
    yield store
    store.close()


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def client(store: ResultStore, publisher: FakePublisher) -> Iterator[TestClient]:
    settings = GatewaySettings(
        gateway_tokens={"tok-acme": "acme", "tok-beta": "beta"},
        store_url="sqlite:///:memory:",
        ws_poll_s=0.02,
        max_body_bytes=4096,
    )
    gateway = Gateway(settings, publisher=publisher, store=store, queue_estimate=lambda: 7)
    with TestClient(build_app(gateway)) as test_client:
        yield test_client


def update(
    task_id: str, status: str, minute: int, *, tenant: str = "acme", **fields: Any
) -> TaskUpdate:
    return TaskUpdate(
        task_id=task_id,
        event_id=f"{task_id}-{status}-{minute}",
        event_type="conveyor.task.test.v1",
        status=status,
        time=T0 + timedelta(minutes=minute),
        tenant=tenant,
        kind="embed",
        trace_id=TRACE,
        **fields,
    )


def completed(store: ResultStore, task_id: str, *, tenant: str = "acme") -> None:
    store.apply(update(task_id, "processing", 0, tenant=tenant, stage="preprocess"))
    store.apply(
        update(
            task_id,
            "completed",
            1,
            tenant=tenant,
            stage="moderation",
            result={"model": "m", "label": "x"},
            verdict="allow",
            detail="verdict allow",
        )
    )


def requests_counted(route: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "conveyor_gateway_requests_total", {"route": route, "code": code}
    )
    return value or 0.0


def test_submit_without_or_with_unknown_token_is_401(
    client: TestClient, publisher: FakePublisher
) -> None:
    task = {"kind": "embed", "input": "hi"}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic tok-acme"}):
        answer = client.post("/v1/tasks", json=task, headers=headers)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
    assert publisher.sent == []


def test_submit_publishes_with_token_tenant_and_answers_202(
    client: TestClient, publisher: FakePublisher
) -> None:
    answer = client.post(
        "/v1/tasks", json={"kind": "embed", "input": "hi", "task_id": "t-1"}, headers=ACME
    )
    assert answer.status_code == 202
    assert answer.json() == {
        "task_id": "t-1",
        "status": "pending",
        "trace_id": TRACE,
        "status_url": "/v1/tasks/t-1",
    }
    assert answer.headers["location"] == "/v1/tasks/t-1"
    assert [(t["task_id"], t["tenant"]) for t in publisher.sent] == [("t-1", "acme")]


def test_submit_without_task_id_or_tenant_gets_a_new_id_and_the_token_tenant(
    client: TestClient, publisher: FakePublisher
) -> None:
    answer = client.post(
        "/v1/tasks", json={"kind": "embed", "input": "hi", "tenant": None}, headers=ACME
    )
    assert answer.status_code == 202
    assert answer.json()["task_id"] == publisher.sent[0]["task_id"]
    assert len(answer.json()["task_id"]) == 36
    assert publisher.sent[0]["tenant"] == "acme"


def test_submit_naming_another_tenant_is_403_and_nothing_is_published(
    client: TestClient, publisher: FakePublisher
) -> None:
    task = {"kind": "embed", "input": "hi", "tenant": "beta"}
    assert client.post("/v1/tasks", json=task, headers=ACME).status_code == 403
    assert client.post("/v1/tasks", json=task, headers=BETA).status_code == 202
    assert [t["tenant"] for t in publisher.sent] == ["beta"]


def test_invalid_task_is_422_with_the_validation_text(
    client: TestClient, publisher: FakePublisher
) -> None:
    answer = client.post(
        "/v1/tasks", json={"kind": "dance", "input": "hi", "colour": "red"}, headers=ACME
    )
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error.startswith("invalid task: ") and "kind" in error and "colour" in error
    assert publisher.sent == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_body_that_is_not_a_json_object_is_400(client: TestClient, body: bytes) -> None:
    headers = {**ACME, "Content-Type": "application/json"}
    answer = client.post("/v1/tasks", content=body, headers=headers)
    assert answer.status_code == 400
    assert answer.json()["error"]


def test_oversize_body_is_413(client: TestClient, publisher: FakePublisher) -> None:
    answer = client.post("/v1/tasks", json={"kind": "embed", "input": "x" * 5000}, headers=ACME)
    assert answer.status_code == 413
    assert publisher.sent == []


def test_task_ids_are_per_tenant_and_a_repeat_is_idempotent(
    client: TestClient, store: ResultStore, publisher: FakePublisher
) -> None:
    completed(store, "stored-1")  # acme's, not submitted here (e.g. straight to the topic)
    task = {"kind": "embed", "input": "hi", "task_id": "stored-1"}
    taken = client.post("/v1/tasks", json=task, headers=ACME)
    assert taken.status_code == 409 and "different submission" in taken.json()["error"]
    assert client.post("/v1/tasks", json=task, headers=BETA).status_code == 202  # beta's own
    first = client.post("/v1/tasks", json={**task, "task_id": "t-2"}, headers=ACME)
    assert first.status_code == 202
    again = client.post("/v1/tasks", json={**task, "task_id": "t-2"}, headers=ACME)
    assert again.status_code == 200, again.text
    assert again.json() == {**first.json(), "status": "pending"}
    assert again.headers["location"] == first.headers["location"]
    other = client.post("/v1/tasks", json={**task, "task_id": "t-2", "input": "ho"}, headers=ACME)
    assert other.status_code == 409
    assert (
        client.post("/v1/tasks", json={**task, "task_id": "t-2"}, headers=BETA).status_code == 202
    )
    sent = [(t["tenant"], t["task_id"]) for t in publisher.sent]
    assert sent == [("beta", "stored-1"), ("acme", "t-2"), ("beta", "t-2")]  # one publish each
    acme = client.get("/v1/tasks/stored-1", headers=ACME).json()
    beta = client.get("/v1/tasks/stored-1", headers=BETA).json()
    assert (acme["status"], acme["tenant"]) == ("completed", "acme")
    assert (beta["status"], beta["tenant"], beta["trace_id"]) == ("pending", "beta", TRACE)
    assert store.get("stored-1", tenant="beta") is not None  # the reservation is a row


def test_repeat_of_a_task_in_progress_answers_its_status(
    client: TestClient, store: ResultStore, publisher: FakePublisher
) -> None:
    task = {"kind": "embed", "input": "hi", "task_id": "t-3"}
    assert client.post("/v1/tasks", json=task, headers=ACME).status_code == 202
    completed(store, "t-3")
    again = client.post("/v1/tasks", json=task, headers=ACME)
    assert again.status_code == 200 and again.json()["status"] == "completed"
    assert len(publisher.sent) == 1


def test_failed_publish_releases_the_reservation(
    client: TestClient, store: ResultStore, publisher: FakePublisher
) -> None:
    task = {"kind": "embed", "input": "hi", "task_id": "t-4"}
    publisher.failure = BrokerError("no broker acknowledgement within 5.0s")
    assert client.post("/v1/tasks", json=task, headers=ACME).status_code == 503
    assert store.get("t-4", tenant="acme") is None
    publisher.failure = PermanentError("record too large")
    assert client.post("/v1/tasks", json=task, headers=ACME).status_code == 422
    assert store.get("t-4", tenant="acme") is None
    publisher.failure = None
    assert client.post("/v1/tasks", json=task, headers=ACME).status_code == 202  # the retry
    assert [t["task_id"] for t in publisher.sent] == ["t-4"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://127.1/hook",
        "http://2130706433/hook",
        "http://localhost:8080/hook",
        "http://api.localhost/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.7/hook",
        "http://[::1]/hook",
        "http://[::ffff:192.168.1.1]/hook",
    ],
)
def test_internal_callback_url_is_422_at_submit(
    client: TestClient, store: ResultStore, publisher: FakePublisher, url: str
) -> None:
    task = {"kind": "embed", "input": "hi", "task_id": "cb-1", "callback_url": url}
    answer = client.post("/v1/tasks", json=task, headers=ACME)
    assert answer.status_code == 422, answer.text
    assert answer.json()["fields"] == ["callback_url"] and "refused" in answer.json()["error"]
    assert publisher.sent == [] and store.get("cb-1", tenant="acme") is None


def test_callback_url_names_are_left_to_notify_and_the_allowlist_is_honoured(
    store: ResultStore, publisher: FakePublisher
) -> None:
    settings = GatewaySettings(
        gateway_tokens={"tok-acme": "acme"},
        store_url="sqlite:///:memory:",
        webhook_allow="127.0.0.1/32,hooks.internal",
    )
    gateway = Gateway(settings, publisher=publisher, store=store, queue_estimate=lambda: 7)
    with TestClient(build_app(gateway)) as client:
        for n, url in enumerate(
            [
                "https://hooks.example.com/h",  # a name: not resolved at the edge
                "http://no-such-host.invalid/h",  # nor this one: notify refuses it later
                "http://127.0.0.1:9000/h",  # allowlisted network
                "http://hooks.internal/h",
            ]
        ):
            task = {"kind": "embed", "input": "hi", "task_id": f"ok-{n}", "callback_url": url}
            assert client.post("/v1/tasks", json=task, headers=ACME).status_code == 202, url
        task = {"kind": "embed", "input": "hi", "callback_url": "http://10.1.2.3/h"}
        assert client.post("/v1/tasks", json=task, headers=ACME).status_code == 422
    assert len(publisher.sent) == 4


def test_unacknowledged_publish_is_503(client: TestClient, publisher: FakePublisher) -> None:
    publisher.failure = BrokerError("no broker acknowledgement within 5.0s")
    answer = client.post("/v1/tasks", json={"kind": "embed", "input": "hi"}, headers=ACME)
    assert answer.status_code == 503
    assert "acknowledgement" in answer.json()["error"]


def test_task_the_client_refuses_to_send_is_422(
    client: TestClient, publisher: FakePublisher
) -> None:
    publisher.failure = PermanentError("task t encodes to 2000000 bytes, over the limit")
    answer = client.post("/v1/tasks", json={"kind": "embed", "input": "hi"}, headers=ACME)
    assert answer.status_code == 422
    assert "over the limit" in answer.json()["error"]


def test_status_has_timeline_result_verdict_and_trace_id(
    client: TestClient, store: ResultStore
) -> None:
    completed(store, "done-1")
    answer = client.get("/v1/tasks/done-1", headers=ACME)
    assert answer.status_code == 200
    task = answer.json()
    assert {
        k: task[k]
        for k in (
            "task_id",
            "tenant",
            "status",
            "stage",
            "verdict",
            "result",
            "trace_id",
            "queue_position_estimate",
        )
    } == {
        "task_id": "done-1",
        "tenant": "acme",
        "status": "completed",
        "stage": "moderation",
        "verdict": "allow",
        "result": {"model": "m", "label": "x"},
        "trace_id": TRACE,
        "queue_position_estimate": None,
    }
    assert task["completed_at"] == "2026-11-23T12:01:00+00:00"
    assert [(e["status"], e["stage"], e["time"]) for e in task["timeline"]] == [
        ("processing", "preprocess", "2026-11-23T12:00:00+00:00"),
        ("completed", "moderation", "2026-11-23T12:01:00+00:00"),
    ]


def test_another_tenants_task_is_404_exactly_like_an_unknown_one(
    client: TestClient, store: ResultStore
) -> None:
    completed(store, "acme-only")
    foreign = client.get("/v1/tasks/acme-only", headers=BETA)
    unknown = client.get("/v1/tasks/no-such-task", headers=BETA)
    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json() == unknown.json() == {"error": "task not found"}
    assert client.get("/v1/tasks/acme-only").status_code == 401


def test_task_submitted_here_answers_pending_with_queue_estimate_before_the_store_knows(
    client: TestClient,
) -> None:
    client.post(
        "/v1/tasks", json={"kind": "embed", "input": "hi", "task_id": "new-1"}, headers=ACME
    )
    task = client.get("/v1/tasks/new-1", headers=ACME).json()
    assert (task["status"], task["trace_id"], task["timeline"]) == ("pending", TRACE, [])
    assert task["queue_position_estimate"] == 7
    assert client.get("/v1/tasks/new-1", headers=BETA).status_code == 404


def test_websocket_pushes_each_status_change_and_closes_after_the_terminal_one(
    client: TestClient, store: ResultStore
) -> None:
    store.apply(update("ws-1", "processing", 0, stage="preprocess"))
    with client.websocket_connect("/v1/tasks/ws-1/events", headers=ACME) as ws:
        first = ws.receive_json()
        assert (first["status"], first["stage"], first["final"]) == (
            "processing",
            "preprocess",
            False,
        )
        store.apply(update("ws-1", "processing", 1, stage="inference"))
        second = ws.receive_json()
        assert (second["status"], second["stage"]) == ("processing", "inference")
        store.apply(update("ws-1", "blocked", 2, stage="moderation", verdict="block"))
        last = ws.receive_json()
        assert (last["status"], last["verdict"], last["final"]) == ("blocked", "block", True)
        closing = ws.receive()
    assert closing["type"] == "websocket.close" and closing["code"] == 1000


def test_websocket_accepts_token_as_subprotocol_and_ends_at_once_for_a_finished_task(
    client: TestClient, store: ResultStore
) -> None:
    completed(store, "ws-done")
    offered = ["conveyor.v1", token_subprotocol("tok-acme")]
    with client.websocket_connect("/v1/tasks/ws-done/events", subprotocols=offered) as ws:
        assert ws.accepted_subprotocol == "conveyor.v1"  # never the token's own
        message = ws.receive_json()
        assert (message["status"], message["final"], message["result"]["label"]) == (
            "completed",
            True,
            "x",
        )
        assert ws.receive()["type"] == "websocket.close"


def test_websocket_left_by_the_client_stops_being_followed(
    client: TestClient, store: ResultStore
) -> None:
    gateway: Gateway = client.app.state.gateway  # type: ignore[attr-defined]
    store.apply(update("ws-gone", "processing", 0, stage="preprocess"))
    with client.websocket_connect("/v1/tasks/ws-gone/events", headers=ACME) as ws:
        ws.receive_json()
        assert gateway.sockets == 1
    deadline = time.monotonic() + 10
    while gateway.sockets and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gateway.sockets == 0


def test_websockets_beyond_the_limit_are_refused_with_503(store: ResultStore) -> None:
    settings = GatewaySettings(
        gateway_tokens={"tok-acme": "acme"}, ws_max_connections=1, ws_poll_s=0.02
    )
    gateway = Gateway(settings, publisher=FakePublisher(), store=store, queue_estimate=lambda: None)
    store.apply(update("ws-many", "processing", 0, stage="preprocess"))
    with (
        TestClient(build_app(gateway)) as client,
        client.websocket_connect("/v1/tasks/ws-many/events", headers=ACME) as first,
    ):
        first.receive_json()
        with pytest.raises(WebSocketDenialResponse) as denied:
            client.websocket_connect("/v1/tasks/ws-many/events", headers=ACME).__enter__()
        assert denied.value.status_code == 503


@pytest.mark.parametrize(
    ("path", "headers", "code"),
    [
        ("/v1/tasks/ws-x/events", {}, 401),
        ("/v1/tasks/ws-x/events?token=wrong", {}, 401),
        ("/v1/tasks/ws-x/events?token=tok-acme", {}, 401),  # valid, but never in a URL
        ("/v1/tasks/ws-x/events?token=tok-acme", ACME, 401),
        ("/v1/tasks/ws-x/events", {"Sec-WebSocket-Protocol": "conveyor.v1, bearer.!!"}, 401),
        ("/v1/tasks/ws-x/events", BETA, 404),
        ("/v1/tasks/unknown/events", ACME, 404),
    ],
)
def test_websocket_handshake_is_denied_without_token_or_for_another_tenant(
    client: TestClient, store: ResultStore, path: str, headers: dict[str, str], code: int
) -> None:
    completed(store, "ws-x")
    with pytest.raises(WebSocketDenialResponse) as denied:
        client.websocket_connect(path, headers=headers).__enter__()
    assert denied.value.status_code == code


def test_requests_are_counted_by_route_template_and_code(client: TestClient) -> None:
    before = requests_counted("/v1/tasks/{task_id}", "404")
    client.get("/v1/tasks/a", headers=ACME)
    client.get("/v1/tasks/b", headers=ACME)
    assert requests_counted("/v1/tasks/{task_id}", "404") == before + 2
    metrics = client.get("/metrics").text
    assert 'conveyor_gateway_requests_total{code="404",route="/v1/tasks/{task_id}"}' in metrics
    assert "/v1/tasks/a" not in metrics


def test_health_and_readiness_answer_while_running(client: TestClient, store: ResultStore) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    store.close()  # an unreachable store makes the gateway unready
    assert client.get("/readyz").status_code == 503


def test_lifespan_starts_and_closes_the_publisher(store: ResultStore) -> None:
    publisher = FakePublisher()
    gateway = Gateway(
        GatewaySettings(), publisher=publisher, store=store, queue_estimate=lambda: None
    )
    with TestClient(build_app(gateway)):
        assert publisher.started and gateway.ready()
    assert publisher.closed and not gateway.ready()


def test_openapi_describes_the_task_routes_and_bearer_auth(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]["/v1/tasks"]) == {"post"}
    assert set(doc["paths"]["/v1/tasks/{task_id}"]) == {"get", "delete"}
    assert "/v1/tasks/{task_id}/events" in doc["paths"]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert doc["security"] == [{"bearerAuth": []}]
    request = doc["components"]["schemas"]["TaskRequest"]
    assert "tenant" not in request["required"] and "kind" in request["required"]
    responses = doc["paths"]["/v1/tasks"]["post"]["responses"]
    assert {"200", "202", "400", "401", "403", "409", "422"} <= set(responses)
    repeated = doc["components"]["schemas"]["TaskRepeated"]["properties"]["status"]
    assert "completed" in repeated["enum"]  # a repeat answers the status as it stands
    assert "queue_position_estimate" in doc["components"]["schemas"]["Task"]["properties"]
