"""The gateway's batch routes with a fake publisher and a real (in-memory SQLite) store: the file
is checked line by line, tasks ride the low lane with the batch's deadline, progress counts,
results in input order, cancel, expiry, tenant isolation, a broker failure midway; and the
inference-side check that drops the tasks of a stopped batch."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient

from conveyor.batches.skip import StoppedBatches
from conveyor.errors import BrokerError, PermanentError
from conveyor.services.gateway.handler import Gateway, build_app
from conveyor.services.gateway.settings import GatewaySettings
from conveyor.store import TaskUpdate, open_store
from tests.unit.test_gateway import ACME, BETA, FakePublisher

pytestmark = pytest.mark.timeout(60)

JSONL = {**ACME, "Content-Type": "application/jsonl"}


def jsonl(lines: list[Any]) -> bytes:
    return "\n".join(json.dumps(line) for line in lines).encode()


def embed_lines(count: int) -> list[dict[str, Any]]:
    return [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/tasks",
         "body": {"kind": "embed", "input": f"text {i}"}}
        for i in range(count)
    ]  # fmt: skip


@pytest.fixture
def store() -> Iterator[Any]:
    store = open_store("sqlite:///:memory:")
    yield store
    store.close()


@pytest.fixture
def publisher() -> FakePublisher:
    return FakePublisher()


@pytest.fixture
def client(store: Any, publisher: FakePublisher) -> Iterator[TestClient]:
    settings = GatewaySettings(
        gateway_tokens={"tok-acme": "acme", "tok-beta": "beta"},
        store_url="sqlite:///:memory:",
        batch_max_bytes=200_000,
        batch_max_tasks=500,
    )
    gateway = Gateway(settings, publisher=publisher, store=store, queue_estimate=lambda: 0)
    with TestClient(build_app(gateway)) as test_client:
        yield test_client


def submit(client: TestClient, lines: list[Any], **params: str) -> Any:
    return client.post("/v1/batches", content=jsonl(lines), headers=JSONL, params=params)


def complete(store: Any, task_id: str, status: str = "completed") -> None:
    store.apply(
        TaskUpdate(
            task_id=task_id,
            event_id=f"{task_id}-{status}",
            event_type="conveyor.task.moderated.v1",
            status=status,
            time=datetime.now(UTC),
            tenant="acme",
            kind="embed",
            stage="moderation",
            result={"model": "m", "embedding": [0.25]} if status == "completed" else None,
            verdict="allow",
        )
    )


def results(client: TestClient, batch_id: str) -> list[dict[str, Any]]:
    answer = client.get(f"/v1/batches/{batch_id}/results", headers=ACME)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/jsonl")
    return [json.loads(line) for line in answer.text.splitlines()]


def test_batch_is_accepted_published_low_lane_with_its_deadline(
    client: TestClient, publisher: FakePublisher
) -> None:
    lines = embed_lines(30)
    lines[7]["body"]["priority"] = "high"  # a line may choose its lane
    before = datetime.now(UTC)
    answer = submit(client, lines, completion_window="2h", metadata='{"job": "nightly"}')
    assert answer.status_code == 202, answer.text
    batch = answer.json()
    assert batch["object"] == "batch" and batch["status"] == "in_progress"
    assert batch["id"].startswith("batch_") and batch["completion_window"] == "2h"
    assert batch["metadata"] == {"job": "nightly"}
    assert batch["request_counts"]["total"] == 30
    assert batch["request_counts"]["pending"] == 30
    assert answer.headers["location"] == f"/v1/batches/{batch['id']}"
    assert batch["results_url"] == f"/v1/batches/{batch['id']}/results"
    assert [t["task_id"] for t in publisher.sent] == [f"{batch['id']}.{n}" for n in range(1, 31)]
    assert [t["priority"] for t in publisher.sent].count("low") == 29
    assert publisher.sent[7]["priority"] == "high"
    expires = datetime.fromisoformat(batch["expires_at"])
    assert before + timedelta(hours=2) <= expires <= datetime.now(UTC) + timedelta(hours=2)
    assert {datetime.fromisoformat(t["deadline"]) for t in publisher.sent} == {expires}
    assert all(t["tenant"] == "acme" for t in publisher.sent)


def test_bad_lines_are_reported_by_line_number_and_nothing_is_created(
    client: TestClient, publisher: FakePublisher, store: Any
) -> None:
    text = "\n".join(
        [
            json.dumps({"custom_id": "a", "body": {"kind": "embed", "input": "fine"}}),
            "{not json",
            "",
            json.dumps({"custom_id": "b", "body": {"kind": "sing", "input": "x"}}),
            json.dumps({"custom_id": "a", "body": {"kind": "embed", "input": "again"}}),
            json.dumps({"custom_id": "c", "body": {"kind": "embed", "input": "x", "task_id": "t"}}),
            json.dumps({"custom_id": "d", "url": "/v1/other", "body": {}}),
            json.dumps({"body": {"kind": "embed", "input": "x"}}),
            json.dumps({"custom_id": "e", "body": {"kind": "generate", "input": "x",
                                                     "params": {"max_new_tokens": 0}}}),
            json.dumps({"custom_id": "f", "body": {"kind": "embed", "input": "x",
                                                     "tenant": "beta"}}),
            json.dumps(["a list"]),
        ]
    )  # fmt: skip
    answer = client.post("/v1/batches", content=text.encode(), headers=JSONL)
    assert answer.status_code == 422
    body = answer.json()
    by_line = {e["line"]: e for e in body["errors"]}
    assert sorted(by_line) == [2, 4, 5, 6, 7, 8, 9, 10, 11]
    assert body["error_count"] == 9
    assert "not valid JSON" in by_line[2]["message"]
    assert by_line[4]["fields"] == ["body.kind"]
    assert "repeats line 1" in by_line[5]["message"]
    assert by_line[6]["fields"] == ["body.task_id"]
    assert by_line[7]["fields"] == ["url"]
    assert by_line[8]["fields"] == ["custom_id"]
    assert by_line[9]["fields"] == ["body.params.max_new_tokens"]
    assert by_line[10]["fields"] == ["body.tenant"]
    assert publisher.sent == []
    assert store.count_by_status()["pending"] == 0


@pytest.mark.parametrize(
    ("content", "headers", "params", "status"),
    [
        (b'{"custom_id": "a"}', {**ACME, "Content-Type": "application/json"}, {}, 415),
        (b"x" * 200_001, JSONL, {}, 413),
        (b"", JSONL, {}, 422),
        (jsonl(embed_lines(501)), JSONL, {}, 422),
        (jsonl(embed_lines(1)), JSONL, {"completion_window": "8d"}, 422),
        (jsonl(embed_lines(1)), JSONL, {"completion_window": "soon"}, 422),
        (jsonl(embed_lines(1)), JSONL, {"metadata": "[1]"}, 422),
        (jsonl(embed_lines(1)), {"Content-Type": "application/jsonl"}, {}, 401),
    ],
)
def test_file_refusals(
    client: TestClient, content: bytes, headers: dict[str, str], params: Any, status: int
) -> None:
    answer = client.post("/v1/batches", content=content, headers=headers, params=params)
    assert answer.status_code == status, answer.text


def test_progress_counts_results_in_input_order_and_completion(
    client: TestClient, store: Any
) -> None:
    batch = submit(client, embed_lines(12)).json()
    ids = [f"{batch['id']}.{n}" for n in range(1, 13)]
    for task_id in ids[:5]:
        complete(store, task_id)
    complete(store, ids[5], "blocked")
    view = client.get(f"/v1/batches/{batch['id']}", headers=ACME).json()
    assert view["status"] == "in_progress"
    counts = view["request_counts"]
    assert (counts["completed"], counts["blocked"], counts["pending"]) == (5, 1, 6)
    lines = results(client, batch["id"])
    assert [line["custom_id"] for line in lines] == [f"req-{i}" for i in range(12)]
    assert [line["id"] for line in lines] == ids
    assert lines[0]["response"]["body"]["result"]["embedding"] == [0.25]
    assert lines[0]["status"] == "completed" and lines[0]["error"] is None
    assert lines[5]["status"] == "blocked" and lines[5]["response"]["body"]["result"] is None
    assert lines[6] == {"id": ids[6], "custom_id": "req-6", "status": "pending",
                        "response": None, "error": None}  # fmt: skip
    for task_id in ids[6:]:
        complete(store, task_id)
    done = client.get(f"/v1/batches/{batch['id']}", headers=ACME).json()
    assert done["status"] == "completed" and done["ended_at"] is not None
    assert done["request_counts"]["completed"] == 11


def test_cancel_ends_unfinished_tasks_cancelled(client: TestClient, store: Any) -> None:
    batch = submit(client, embed_lines(10)).json()
    for n in range(1, 4):
        complete(store, f"{batch['id']}.{n}")
    answer = client.post(f"/v1/batches/{batch['id']}/cancel", headers=ACME)
    assert answer.status_code == 200
    view = answer.json()
    assert view["status"] == "cancelled"
    assert (view["request_counts"]["completed"], view["request_counts"]["cancelled"]) == (3, 7)
    lines = results(client, batch["id"])
    assert [line["status"] for line in lines] == ["completed"] * 3 + ["cancelled"] * 7
    assert lines[9]["error"]["code"] == "cancelled"
    task = client.get(f"/v1/tasks/{batch['id']}.10", headers=ACME).json()
    assert task["status"] == "cancelled"
    assert task["timeline"][-1]["detail"] == f"batch {batch['id']} cancelled"


def test_window_passed_batch_expires_with_its_unfinished_tasks(
    client: TestClient, store: Any
) -> None:
    batch = submit(client, embed_lines(4), completion_window="1s").json()
    complete(store, f"{batch['id']}.1")
    time.sleep(1.2)  # the window is the batch's own clock: wall time, 1 s
    view = client.get(f"/v1/batches/{batch['id']}", headers=ACME).json()
    assert view["status"] == "expired"
    assert (view["request_counts"]["completed"], view["request_counts"]["expired"]) == (1, 3)
    lines = results(client, batch["id"])
    assert lines[3]["error"]["code"] == "expired"
    assert "completion window 1s passed" in lines[3]["error"]["message"]
    cancelled = client.post(f"/v1/batches/{batch['id']}/cancel", headers=ACME).json()
    assert cancelled["status"] == "expired"  # an ended batch stays as it ended


def test_another_tenant_sees_no_batch(client: TestClient) -> None:
    batch = submit(client, embed_lines(2)).json()
    for path in ("", "/results"):
        assert client.get(f"/v1/batches/{batch['id']}{path}", headers=BETA).status_code == 404
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=BETA).status_code == 404
    assert client.get(f"/v1/tasks/{batch['id']}.1", headers=BETA).status_code == 404
    assert client.get("/v1/batches/batch_unknown", headers=ACME).status_code == 404


def test_broker_failure_midway_fails_the_unpublished_tasks_and_the_batch(
    client: TestClient, publisher: FakePublisher
) -> None:
    publisher.failure = BrokerError("no broker acknowledgement within 5.0s")
    answer = submit(client, embed_lines(5))
    assert answer.status_code == 503
    batch = answer.json()
    assert batch["status"] == "failed"
    assert "BrokerError" in batch["errors"][0]["message"]
    assert batch["request_counts"]["failed"] == 5
    line = results(client, batch["id"])[0]
    assert line["error"]["message"].startswith("not published: ")


def test_a_task_refused_alone_fails_alone(
    client: TestClient, publisher: FakePublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = publisher.submit

    async def refuse_third(task: Any) -> Any:
        if task["task_id"].endswith(".3"):
            raise PermanentError("task encodes to 2000000 bytes, over the limit")
        return await real(task)

    monkeypatch.setattr(publisher, "submit", refuse_third)
    answer = submit(client, embed_lines(4))
    assert answer.status_code == 202
    assert answer.json()["request_counts"]["failed"] == 1
    assert len(publisher.sent) == 3


def test_openapi_documents_the_batch_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/batches", "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/cancel",
            "/v1/batches/{batch_id}/results"} <= set(paths)  # fmt: skip


def test_stopped_batches_check_reads_the_store_and_caches(client: TestClient, store: Any) -> None:
    running = submit(client, embed_lines(2)).json()["id"]
    cancelled = submit(client, embed_lines(2)).json()["id"]
    client.post(f"/v1/batches/{cancelled}/cancel", headers=ACME)
    now = [0.0]
    check = StoppedBatches(store, ttl_s=2.0, clock=lambda: now[0])
    assert check.stopped("acme", f"{cancelled}.1")
    assert not check.stopped("acme", f"{running}.1")
    assert not check.stopped("beta", f"{cancelled}.1")  # another tenant's id names no batch
    assert not check.stopped("acme", "plain-task-id")
    client.post(f"/v1/batches/{running}/cancel", headers=ACME)
    assert not check.stopped("acme", f"{running}.2")  # cached for ttl_s
    now[0] = 2.5
    assert check.stopped("acme", f"{running}.2")


def test_cli_follows_a_batch_to_its_end_and_writes_results_in_order(
    client: TestClient, store: Any, tmp_path: Any
) -> None:
    import io

    from conveyor.cli.batch import _outcome, follow, progress_line

    batch = submit(client, embed_lines(3)).json()
    assert progress_line(batch, 0).startswith("[" + "-" * 30 + "] 0/3 waiting")
    for n in (1, 2):
        complete(store, f"{batch['id']}.{n}")
    complete(store, f"{batch['id']}.3", "failed")
    out = io.StringIO()
    client.headers.update(ACME)
    ended = follow(client, batch, poll_s=0.01, out=out)
    assert ended["status"] == "completed"
    assert (
        out.getvalue().splitlines()[-1].startswith("[" + "#" * 30 + "] 3/3 completed 2, failed 1")
    )
    path = tmp_path / "results.jsonl"
    assert _outcome(client, ended, path) == 0
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["custom_id"] for line in written] == ["req-0", "req-1", "req-2"]


def test_inference_drops_the_records_of_a_cancelled_batch_and_runs_the_rest(
    client: TestClient, store: Any
) -> None:
    from conveyor.services.inference.handler import InferenceResources
    from conveyor.services.inference.settings import InferenceSettings
    from tests.stages import infer
    from tests.unit.test_handlers import FakeRegistry, ctx, preprocessed

    running = submit(client, embed_lines(1)).json()["id"]
    cancelled = submit(client, embed_lines(1)).json()["id"]
    client.post(f"/v1/batches/{cancelled}/cancel", headers=ACME)
    registry = FakeRegistry()
    events = [preprocessed(f"{running}.1"), preprocessed(f"{cancelled}.1"), preprocessed("solo")]
    resources = InferenceResources(models=registry, stopped_batches=StoppedBatches(store))  # type: ignore[arg-type]
    out = infer(events, ctx(InferenceSettings(stage="inference"), resources))
    assert out[1] is None  # dropped: no output, the store already says cancelled
    assert out[0] is not None and out[2] is not None
    assert registry.calls == [("embed", 2)]


def test_gateway_sweeps_a_batch_past_its_window_that_nobody_reads(
    store: Any, publisher: FakePublisher
) -> None:
    settings = GatewaySettings(
        gateway_tokens={"tok-acme": "acme"}, store_url="sqlite:///:memory:", batch_sweep_s=0.05
    )
    gateway = Gateway(settings, publisher=publisher, store=store, queue_estimate=lambda: 0)
    with TestClient(build_app(gateway)) as client:
        batch = submit(client, embed_lines(3), completion_window="1s").json()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # no request reads it: only the sweep can end it
            if store.get_batch("acme", batch["id"]).status == "expired":
                break
            time.sleep(0.05)
        assert store.get_batch("acme", batch["id"]).status == "expired"
        assert store.batch_counts("acme", batch["id"])["expired"] == 3
