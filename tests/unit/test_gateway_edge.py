"""The gateway's edge hygiene with a fake publisher (no broker): every parameter checked before
publishing (422 naming the field), JSON only (415), deep nesting 400, status URLs on the
configured base (never the Host header), WebSockets capped per tenant, secrets typed as secrets,
credentials masked in every log line, and an OpenAPI document that says what is accepted."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from starlette.testclient import TestClient, WebSocketDenialResponse

from conveyor.services.gateway.handler import Gateway, build_app
from conveyor.services.gateway.settings import GatewaySettings
from conveyor.settings import KafkaSettings, StoreSettings
from conveyor.store import ResultStore, open_store
from conveyor.web.auth import token_subprotocol
from conveyor.web.redact import RedactingFilter
from tests.unit.test_gateway import ACME, BETA, FakePublisher, update

pytestmark = pytest.mark.timeout(60)

TOKENS = {"tok-acme": "acme", "tok-beta": "beta"}


@pytest.fixture
def store() -> Iterator[ResultStore]:
    opened = open_store("sqlite:///:memory:")
    yield opened
    opened.close()


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


def gateway_client(store: ResultStore, publisher: FakePublisher, **settings: Any) -> TestClient:
    values: dict[str, Any] = {"gateway_tokens": TOKENS, "ws_poll_s": 0.02, **settings}
    gateway = Gateway(
        GatewaySettings(**values), publisher=publisher, store=store, queue_estimate=lambda: 0
    )
    return TestClient(build_app(gateway))


@pytest.fixture
def client(store: ResultStore, publisher: FakePublisher) -> Iterator[TestClient]:
    with gateway_client(store, publisher) as test_client:
        yield test_client


def post(client: TestClient, task: dict[str, Any], headers: dict[str, str] = ACME) -> Any:
    return client.post(
        "/v1/tasks", json={"kind": "generate", "input": "hi", **task}, headers=headers
    )


@pytest.mark.parametrize(
    ("task", "field"),
    [
        ({"params": {"do_sample": True, "seed": 1e30}}, "params.seed"),
        ({"params": {"seed": -1}}, "params.seed"),
        ({"params": {"max_new_tokens": 0}}, "params.max_new_tokens"),
        ({"params": {"max_new_tokens": 100_000}}, "params.max_new_tokens"),
        ({"params": {"temperature": 0}}, "params.temperature"),
        ({"params": {"top_p": 1.5}}, "params.top_p"),
        ({"params": {"colour": "red"}}, "params.colour"),
        ({"kind": "embed", "params": {"seed": 1}}, "params.seed"),
        ({"template": "no-such-template"}, "template"),
        ({"model": "gpt-17"}, "model"),
        ({"deadline": "9999-12-31T23:59:59-14:00"}, "deadline"),
        ({"deadline": "2999-01-01T00:00:00Z"}, "deadline"),
        ({"kind": "classify", "labels": ["x" * 500]}, "labels"),
        ({"kind": "classify", "labels": ["x"] * 65}, "labels"),
    ],
)
def test_invalid_parameter_is_422_naming_the_field_and_nothing_is_published(
    client: TestClient, publisher: FakePublisher, task: dict[str, Any], field: str
) -> None:
    answer = post(client, task)
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["fields"] and field in answer.json()["error"]
    assert publisher.sent == []


def test_nan_and_infinity_in_params_are_422(client: TestClient, publisher: FakePublisher) -> None:
    for value in ("NaN", "Infinity", "-Infinity"):
        body = '{"kind": "generate", "input": "hi", "params": {"temperature": ' + value + "}}"
        answer = client.post(
            "/v1/tasks", content=body, headers={**ACME, "Content-Type": "application/json"}
        )
        assert answer.status_code == 422 and answer.json()["fields"] == ["params.temperature"]
    assert publisher.sent == []


def test_valid_parameters_are_published_in_canonical_form(
    client: TestClient, publisher: FakePublisher
) -> None:
    params = {"max_new_tokens": "32", "do_sample": True, "seed": 2**63 - 1, "temperature": 0.7}
    answer = post(client, {"params": params, "template": "answer", "model": "smollm2"})
    assert answer.status_code == 202, answer.text
    assert publisher.sent[0]["params"] == {
        "max_new_tokens": "32",
        "do_sample": "true",
        "seed": str(2**63 - 1),
        "temperature": "0.7",
    }


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"]
)
def test_body_that_is_not_application_json_is_415(
    client: TestClient, publisher: FakePublisher, content_type: str | None
) -> None:
    headers = dict(ACME) | ({"Content-Type": content_type} if content_type else {})
    answer = client.post("/v1/tasks", content=b'{"kind": "embed", "input": "hi"}', headers=headers)
    assert answer.status_code == 415
    assert publisher.sent == []
    charset = {**ACME, "Content-Type": "application/json; charset=utf-8"}
    body = b'{"kind": "embed", "input": "hi"}'
    assert client.post("/v1/tasks", content=body, headers=charset).status_code == 202


def test_deeply_nested_json_is_400_not_500(client: TestClient) -> None:
    headers = {**ACME, "Content-Type": "application/json"}
    for body in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        answer = client.post("/v1/tasks", content=body, headers=headers)
        assert answer.status_code in (400, 413), answer.text
    nested = "[" * 3_000 + "]" * 3_000  # under the size limit: the depth is what fails
    answer = client.post("/v1/tasks", content=nested, headers=headers)
    assert answer.status_code == 400 and "deep" in answer.json()["error"]
    params = '{"kind": "embed", "input": "hi", "params": {"x": ' + "[" * 500 + "]" * 500 + "}}"
    assert client.post("/v1/tasks", content=params, headers=headers).status_code == 422


def test_status_url_uses_the_public_base_url_never_the_host_header(
    publisher: FakePublisher,
) -> None:
    evil = {**ACME, "Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    store = open_store("sqlite:///:memory:")  # each client's lifespan closes its store
    with gateway_client(store, publisher) as relative:
        answer = post(relative, {"task_id": "u-1"}, evil)
        assert answer.json()["status_url"] == answer.headers["location"] == "/v1/tasks/u-1"
    base = "https://conveyor.example.com/api/"
    store = open_store("sqlite:///:memory:")
    with gateway_client(store, publisher, public_base_url=base) as based:
        answer = post(based, {"task_id": "u-2"}, evil)
        url = "https://conveyor.example.com/api/v1/tasks/u-2"
        assert answer.json()["status_url"] == answer.headers["location"] == url
    with pytest.raises(ValidationError):
        GatewaySettings(public_base_url="javascript:alert(1)")


def test_websocket_cap_is_per_tenant_as_well_as_per_process(
    store: ResultStore,
    publisher: FakePublisher,
) -> None:
    for tenant in ("acme", "beta"):
        store.apply(update(f"cap-{tenant}", "processing", 0, tenant=tenant, stage="preprocess"))
    with (
        gateway_client(store, publisher, ws_max_per_tenant=2, ws_max_connections=3) as client,
        client.websocket_connect("/v1/tasks/cap-acme/events", headers=ACME) as one,
        client.websocket_connect("/v1/tasks/cap-acme/events", headers=ACME) as two,
    ):
        one.receive_json(), two.receive_json()
        with pytest.raises(WebSocketDenialResponse) as denied:
            client.websocket_connect("/v1/tasks/cap-acme/events", headers=ACME).__enter__()
        assert denied.value.status_code == 429
        with client.websocket_connect("/v1/tasks/cap-beta/events", headers=BETA) as other:
            assert other.receive_json()["tenant"] == "beta"  # another tenant still gets in
            with pytest.raises(WebSocketDenialResponse) as full:
                client.websocket_connect("/v1/tasks/cap-beta/events", headers=BETA).__enter__()
            assert full.value.status_code == 503  # the process cap


def test_websocket_subprotocol_token_authenticates_and_is_never_echoed(
    client: TestClient,
    store: ResultStore,
) -> None:
    store.apply(update("sp-1", "processing", 0, stage="preprocess"))
    for offered in (
        [token_subprotocol("tok-acme")],
        [token_subprotocol("tok-acme"), "conveyor.v1"],
    ):
        with client.websocket_connect("/v1/tasks/sp-1/events", subprotocols=offered) as ws:
            assert ws.accepted_subprotocol in (None, "conveyor.v1")
            assert ws.receive_json()["task_id"] == "sp-1"
    with pytest.raises(WebSocketDenialResponse) as denied:
        client.websocket_connect(
            "/v1/tasks/sp-1/events", subprotocols=["conveyor.v1", token_subprotocol("tok-beta")]
        ).__enter__()
    assert denied.value.status_code == 404  # beta's token: acme's task does not exist for it


def test_secret_settings_never_print_their_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_GATEWAY_TOKENS", '{"tok-very-secret": "acme"}')
    monkeypatch.setenv("CONVEYOR_KAFKA_SASL_PASSWORD", "sasl-very-secret")
    monkeypatch.setenv("CONVEYOR_STORE_URL", "postgresql://u:pg-very-secret@db/conveyor")
    settings = GatewaySettings()
    shown = repr(settings) + str(settings) + repr(StoreSettings()) + repr(KafkaSettings())
    shown += str(settings.model_dump())
    for secret in ("tok-very-secret", "sasl-very-secret", "pg-very-secret"):
        assert secret not in shown
    assert isinstance(settings.kafka_sasl_password, SecretStr)
    assert settings.store_url.get_secret_value().endswith("@db/conveyor")
    assert [t.get_secret_value() for t in settings.gateway_tokens] == ["tok-very-secret"]


@pytest.mark.parametrize(
    "malformed",
    ['{"tok-very-secret": ', '["tok-very-secret"]', '{"tok-very-secret": ["acme"]}'],
)
def test_malformed_token_map_error_does_not_echo_it(
    monkeypatch: pytest.MonkeyPatch, malformed: str
) -> None:
    monkeypatch.setenv("CONVEYOR_GATEWAY_TOKENS", malformed)
    with pytest.raises(Exception) as failed:  # noqa: B017 - settings raise either of two types
        GatewaySettings()
    assert "gateway_tokens" in str(failed.value)
    assert "very-secret" not in str(failed.value) and "very-secret" not in repr(failed.value)


def test_redacting_filter_masks_known_tokens_and_credential_shapes() -> None:
    redactor = RedactingFilter(["tok-very-secret"])
    lines = [
        ("< Authorization: Bearer tok-very-secret", "tok-very-secret"),
        ("< authorization: Bearer anything-else", "anything-else"),
        ("GET /v1/tasks/x/events?token=unknown-tok HTTP/1.1", "unknown-tok"),
        ("< Sec-WebSocket-Protocol: conveyor.v1, " + token_subprotocol("zz-top"), "enotdG9w"),
        ("headers={'authorization': 'Bearer abc123'}", "abc123"),
        ("the token is tok-very-secret.", "tok-very-secret"),
    ]
    for line, secret in lines:
        record = logging.LogRecord("x", logging.DEBUG, __file__, 1, "%s", (line,), None)
        assert redactor.filter(record)
        assert secret not in record.getMessage() and "***" in record.getMessage()
    plain = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "task accepted task_id=%s", ("t",), None
    )
    redactor.filter(plain)
    assert plain.getMessage() == "task accepted task_id=t"


def test_openapi_says_what_the_server_accepts(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    request = doc["components"]["schemas"]["TaskRequest"]
    for nullable in ("tenant", "task_id"):
        assert {"type": "null"} in request["properties"][nullable]["anyOf"]
    assert post(client, {"tenant": None, "task_id": None}).status_code == 202
    responses = doc["paths"]["/v1/tasks"]["post"]["responses"]
    assert {"408", "413", "415", "422"} <= set(responses)
    schemes = doc["components"]["securitySchemes"]
    assert "queryToken" not in schemes and "subprotocolToken" in schemes
