"""The gateway's batch routes and its paced dispatcher with a fake publisher and a real (SQLite)
store: the file is checked line by line, tasks ride the low lane with the batch's deadline and
are published within the `batch_in_flight` window, progress counts, results in input order,
cancel (never-dispatched tasks in the store, dispatched ones through the task canceller), expiry,
the list, tenant isolation, a broker that does not acknowledge (released and retried)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from starlette.testclient import TestClient

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


def wait_for(check: Any, what: str, timeout_s: float = 20.0) -> None:
    """Until the dispatcher (a background task of the app) has done what `check` looks for."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def dispatched(client: TestClient, lines: list[Any], publisher: FakePublisher) -> Any:
    """Submit a batch and wait until all its tasks are published (the window allows it)."""
    before = len(publisher.sent)
    batch = submit(client, lines).json()
    wait_for(lambda: len(publisher.sent) >= before + len(lines), "every task published")
    return batch


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
    wait_for(lambda: len(publisher.sent) == 30, "30 tasks published")
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
    client: TestClient, store: Any, publisher: FakePublisher
) -> None:
    batch = dispatched(client, embed_lines(12), publisher)
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


def test_cancel_ends_unfinished_tasks_cancelled(
    client: TestClient, store: Any, publisher: FakePublisher
) -> None:
    batch = dispatched(client, embed_lines(10), publisher)
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


def test_tasks_the_broker_does_not_acknowledge_are_released_and_published_later(
    client: TestClient, publisher: FakePublisher, store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    publisher.failure = BrokerError("no broker acknowledgement within 5.0s")
    answer = submit(client, embed_lines(5))
    assert answer.status_code == 202  # accepted: stored, published when the broker takes it
    batch = answer.json()
    wait_for(lambda: "released, retried" in caplog.text, "a refused round")
    view = client.get(f"/v1/batches/{batch['id']}", headers=ACME).json()
    assert view["status"] == "in_progress" and view["request_counts"]["pending"] == 5
    assert publisher.sent == []
    publisher.failure = None  # the broker is back: nothing was lost
    wait_for(lambda: len(publisher.sent) == 5, "the released tasks published")
    assert [t["task_id"] for t in publisher.sent] == [f"{batch['id']}.{n}" for n in range(1, 6)]


def test_a_task_refused_alone_fails_alone(
    client: TestClient, publisher: FakePublisher, store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = publisher.submit

    async def refuse_third(task: Any) -> Any:
        if task["task_id"].endswith(".3"):
            raise PermanentError("task encodes to 2000000 bytes, over the limit")
        return await real(task)

    monkeypatch.setattr(publisher, "submit", refuse_third)
    answer = submit(client, embed_lines(4))
    assert answer.status_code == 202
    batch_id = answer.json()["id"]
    wait_for(lambda: store.batch_counts("acme", batch_id)["failed"] == 1, "the third failed")
    wait_for(lambda: len(publisher.sent) == 3, "the others published")
    line = results(client, batch_id)[2]
    assert line["error"]["message"].startswith("not published: task encodes")


def test_openapi_documents_the_batch_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/batches", "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/cancel",
            "/v1/batches/{batch_id}/results"} <= set(paths)  # fmt: skip


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


class FakeCanceller:
    """Records the tasks the batch cancel sends through the ordinary task cancel, and cancels
    them in the store as `Canceller.cancel` does (without a broker)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.cancelled: list[tuple[str, str]] = []

    def cancel(self, task_id: str, tenant: str) -> Any:
        self.cancelled.append((task_id, tenant))
        self.store.apply(
            TaskUpdate(
                task_id=task_id,
                event_id=f"{task_id}-cancel",
                event_type="conveyor.task.status.v1",
                status="cancelled",
                time=datetime.now(UTC),
                tenant=tenant,
                stage="gateway",
                detail="cancelled by the tenant (gateway)",
            )
        )
        return None


@pytest.fixture
def paced(store: Any, publisher: FakePublisher) -> Iterator[tuple[TestClient, FakeCanceller]]:
    """A gateway whose window is 4 batch tasks, with a task canceller."""
    settings = GatewaySettings(
        gateway_tokens={"tok-acme": "acme", "tok-beta": "beta"},
        store_url="sqlite:///:memory:",
        batch_in_flight=4,
        batch_dispatch_poll_s=0.02,
    )
    canceller = FakeCanceller(store)
    gateway = Gateway(
        settings, publisher=publisher, store=store, queue_estimate=lambda: 0,
        canceller=canceller,  # type: ignore[arg-type]
    )  # fmt: skip
    with TestClient(build_app(gateway)) as test_client:
        yield test_client, canceller


def test_the_window_bounds_what_is_dispatched_and_refills_as_tasks_end(
    paced: tuple[TestClient, FakeCanceller], publisher: FakePublisher, store: Any
) -> None:
    client, _ = paced
    batch = submit(client, embed_lines(10)).json()
    wait_for(lambda: len(publisher.sent) == 4, "the window filled")
    time.sleep(0.3)  # many dispatcher polls: none may publish past the window
    assert len(publisher.sent) == 4
    for task in publisher.sent[:3]:
        complete(store, task["task_id"])
    wait_for(lambda: len(publisher.sent) == 7, "three more, as three ended")
    assert [t["task_id"] for t in publisher.sent] == [f"{batch['id']}.{n}" for n in range(1, 8)]


def test_a_restarted_gateway_resumes_dispatch_from_the_store(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    settings = GatewaySettings(
        gateway_tokens={"tok-acme": "acme"},
        store_url=url,
        batch_in_flight=4,
        batch_dispatch_poll_s=0.02,
    )

    def gateway(publisher: FakePublisher) -> Gateway:  # it closes its store when it stops
        store = open_store(url)
        return Gateway(settings, publisher=publisher, store=store, queue_estimate=lambda: 0)

    def recorded() -> int:  # published and recorded so (a round cut short by the stop would
        # leave its claims to lapse first, CLAIM_LEASE_S: docs/batches.md, failure modes)
        with sqlite3.connect(tmp_path / "conveyor.db") as db:
            query = "SELECT COUNT(*) FROM batch_dispatch WHERE state = 'dispatched'"
            return int(db.execute(query).fetchone()[0])

    first = FakePublisher()
    with TestClient(build_app(gateway(first))) as client:
        batch = submit(client, embed_lines(10)).json()
        wait_for(lambda: recorded() == 4, "the window filled and recorded")
    assert len(first.sent) == 4
    store = open_store(url)
    try:
        for task in first.sent:  # they end while no gateway runs
            complete(store, task["task_id"])
    finally:
        store.close()
    second = FakePublisher()
    with TestClient(build_app(gateway(second))):
        wait_for(lambda: len(second.sent) == 4, "dispatch resumed")
    assert [t["task_id"] for t in second.sent] == [f"{batch['id']}.{n}" for n in range(5, 9)]


def test_a_small_batch_is_not_starved_by_a_big_one(
    paced: tuple[TestClient, FakeCanceller], publisher: FakePublisher, store: Any
) -> None:
    client, _ = paced
    big = submit(client, embed_lines(40)).json()
    wait_for(lambda: len(publisher.sent) == 4, "the window filled")
    small = client.post("/v1/batches", content=jsonl(embed_lines(2)),
                        headers={**BETA, "Content-Type": "application/jsonl"}).json()  # fmt: skip
    for task in publisher.sent[:4]:  # the window's room comes back: shared by the tenants
        complete(store, task["task_id"])
    wait_for(lambda: len(publisher.sent) == 8, "the room refilled")
    sent = [t["task_id"] for t in publisher.sent]
    assert sorted(sent[4:]) == sorted(
        [f"{big['id']}.5", f"{big['id']}.6", f"{small['id']}.1", f"{small['id']}.2"]
    )


def test_cancel_stops_dispatch_and_cancels_dispatched_tasks_through_the_task_cancel(
    paced: tuple[TestClient, FakeCanceller], publisher: FakePublisher, store: Any
) -> None:
    client, canceller = paced
    batch = submit(client, embed_lines(10)).json()
    wait_for(lambda: len(publisher.sent) == 4, "the window filled")
    complete(store, f"{batch['id']}.1")
    view = client.post(f"/v1/batches/{batch['id']}/cancel", headers=ACME).json()
    assert view["status"] == "cancelled"
    assert (view["request_counts"]["completed"], view["request_counts"]["cancelled"]) == (1, 9)
    sent = [t["task_id"] for t in publisher.sent]  # 4, or 5 if task 1's room was refilled
    assert len(sent) in (4, 5)
    # Dispatched and unfinished: the ordinary task cancel (the stages drop their records).
    assert canceller.cancelled == [(task_id, "acme") for task_id in sent[1:]]
    # Never dispatched: ended in the store, and never published.
    task = client.get(f"/v1/tasks/{batch['id']}.9", headers=ACME).json()
    assert task["timeline"][-1]["detail"] == f"batch {batch['id']} cancelled"
    time.sleep(0.3)
    assert len(publisher.sent) == len(sent)


def test_list_shows_the_callers_batches_newest_first_with_a_cursor(
    client: TestClient,
) -> None:
    ids = [submit(client, embed_lines(1)).json()["id"] for _ in range(3)]
    client.post("/v1/batches", content=jsonl(embed_lines(1)),
                headers={**BETA, "Content-Type": "application/jsonl"})  # fmt: skip
    page = client.get("/v1/batches", headers=ACME, params={"limit": "2"}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [b["id"] for b in page["data"]] == ids[::-1][:2]
    assert page["first_id"] == ids[2] and page["last_id"] == ids[1]
    assert page["data"][0]["request_counts"]["total"] == 1
    rest = client.get("/v1/batches", headers=ACME, params={"after": page["last_id"]}).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and rest["has_more"] is False
    assert client.get("/v1/batches", headers=ACME, params={"limit": "0"}).status_code == 422
    assert client.get("/v1/batches", headers=BETA).json()["data"][0]["id"] not in ids


def test_cli_lists_batches_newest_first(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from conveyor.cli import batch as cli
    from conveyor.cli.main import main

    ids = [submit(client, embed_lines(2)).json()["id"] for _ in range(2)]
    client.headers.update(ACME)
    monkeypatch.setattr(cli, "_client", lambda args: contextlib.nullcontext(client))
    assert main(["batch", "list", "--limit", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{ids[1]}  in_progress")
    assert out[0].endswith("0/2")
    assert out[1] == f"more: conveyor batch list --after {ids[1]}"


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
