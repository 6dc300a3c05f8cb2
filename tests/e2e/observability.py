"""One traced end-to-end run shared by the tracing and metrics tests (a stack start costs ~20 s).

All five services run as processes (LocalStack) exporting OTLP/HTTP to an `OtlpReceiver`; tasks
are submitted from a separate traced process (the `conveyor-submit` service), plus one task
published as structured JSON with no trace context, one that preprocess dead-letters, and one
whose first webhook answers 503 so notify retries it. Every service's `/metrics` is scraped
while the stack still runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from conveyor.local.otlp import OtlpReceiver, ReceivedSpan
from conveyor.local.receiver import WebhookReceiver
from conveyor.local.samples import MINILM_ONLY, SENTENCES
from conveyor.local.stack import LocalStack
from conveyor.store import open_store
from conveyor.store.base import TaskRecord
from tests.e2e.conftest import SECRETS, WEBHOOK_ENV
from tests.support import produce_structured, task_doc

SUBMIT = """
import json, sys
from conveyor.client import TaskClient
from conveyor.settings import KafkaSettings
from conveyor.telemetry import tracing
assert tracing.init_tracing("submit"), "tracing is off in the submitting process"
tasks = json.load(open(sys.argv[1]))
client = TaskClient(KafkaSettings(), source="/tests/e2e")
traces = dict(client.submit(task) for task in tasks)
client.flush()
tracing.shutdown_tracing()
print(json.dumps(traces))
"""


@dataclass
class ObservedRun:
    prefix: str
    expect: dict[str, str]  # task id -> final status
    submitted_traces: dict[str, str]  # task id -> trace id, as the submitter saw it
    unsampled_task: str  # published without trace context
    retried_task: str
    dead_task: str
    spans: list[ReceivedSpan]
    metrics: dict[str, str]  # service -> /metrics text
    records: dict[str, TaskRecord | None]
    logs: dict[str, str]
    store_url: str

    def topic(self, name: str) -> str:
        return self.prefix + name


def tasks_for(run: str, callback: str) -> tuple[list[dict[str, object]], dict[str, str]]:
    tasks: list[dict[str, object]] = []
    for i in range(8):
        tasks.append(
            {
                "task_id": f"{run}-embed-{i}",
                "kind": "embed",
                "input": f"{SENTENCES[i % len(SENTENCES)]} ({i})",
            }
        )
    for i in range(4):
        tasks.append(
            {
                "task_id": f"{run}-classify-{i}",
                "kind": "classify",
                "input": SENTENCES[i],
                "labels": ["business", "weather", "culture"],
            }
        )
    tasks.append({"task_id": f"{run}-invalid", "kind": "embed", "input": "  \n "})
    for n, task in enumerate(tasks):
        task.update(tenant=["acme", "globex"][n % 2], callback_url=callback)
    expect = {str(t["task_id"]): "completed" for t in tasks}
    expect[f"{run}-invalid"] = "failed"
    return tasks, expect


_RUNS: dict[str, ObservedRun] = {}


def shared_run(bootstrap: str, tmp_path_factory: Any) -> ObservedRun:
    """The run, made once per session and broker: test_tracing and test_metrics both read it."""
    if bootstrap not in _RUNS:
        _RUNS[bootstrap] = observed_run(bootstrap, tmp_path_factory.mktemp("observed"))
    return _RUNS[bootstrap]


def observed_run(bootstrap: str, workdir: Path) -> ObservedRun:
    prefix = f"o{uuid.uuid4().hex[:8]}."
    run = prefix.strip(".")
    store_url = f"sqlite:///{workdir / 'conveyor.db'}"
    with OtlpReceiver() as otlp:
        hooks = WebhookReceiver(SECRETS).start()
        try:
            tasks, expect = tasks_for(run, hooks.url)
            unsampled, retried = f"{run}-untraced", f"{run}-embed-0"
            expect[unsampled] = "completed"
            hooks.scripted[retried] = [503]  # first webhook fails: notify takes retry rung 1
            env = service_env(bootstrap, prefix, store_url, otlp.endpoint)
            stack = LocalStack(workdir, env)
            stack.apply_topics()
            stack.start()
            try:
                traces = submit(tasks, env, workdir)
                produce_structured(
                    bootstrap,
                    prefix + "conveyor.task.submitted",
                    [task_doc(unsampled, text=SENTENCES[0], callback_url=hooks.url)],
                )
                wait_done(stack, hooks, expect, store_url)
                wait_spans(otlp, expect, retried)
                metrics = scrape_settled(stack, prefix)
            finally:
                stack.stop()  # SIGTERM: each service flushes its last spans on the way out
            records = _records(store_url, expect)
        finally:
            hooks.stop()
        spans = otlp.spans()
    logs = {name: proc.log_path.read_text(errors="replace") for name, proc in stack.procs.items()}
    return ObservedRun(
        prefix,
        expect,
        traces,
        unsampled,
        retried,
        f"{run}-invalid",
        spans,
        metrics,
        records,
        logs,
        store_url,
    )


def service_env(bootstrap: str, prefix: str, store_url: str, otlp: str) -> dict[str, str]:
    return {
        "CONVEYOR_KAFKA_BOOTSTRAP": bootstrap,
        "CONVEYOR_TOPIC_PREFIX": prefix,
        "CONVEYOR_STORE_URL": store_url,
        **WEBHOOK_ENV,
        "CONVEYOR_RETRY_DELAYS": "[1, 2, 4]",
        "CONVEYOR_MODELS": MINILM_ONLY,
        "OTEL_SDK_DISABLED": "false",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        # Export within 200 ms of a span ending, so the test need not wait for the 5 s default.
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }


def submit(tasks: list[dict[str, object]], env: dict[str, str], workdir: Path) -> dict[str, str]:
    path = workdir / "tasks.json"
    path.write_text(json.dumps(tasks))
    proc = subprocess.run(
        [sys.executable, "-c", SUBMIT, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env, "OTEL_SERVICE_NAME": "conveyor-submit"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    traces: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return traces


def wait_done(
    stack: LocalStack,
    hooks: WebhookReceiver,
    expect: dict[str, str],
    store_url: str,
    timeout_s: float = 120,
) -> None:
    store = open_store(store_url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            notified = {d.task_id for d in hooks.snapshot()}
            terminal = sum(store.count_by_status()[s] for s in ("completed", "failed"))
            if terminal >= len(expect) and set(expect) <= notified:
                return
            assert not stack.supervise(), "a service died:\n" + _tails(stack)
            time.sleep(0.25)
    finally:
        store.close()
    raise AssertionError(f"tasks not done in {timeout_s}s:\n{_tails(stack)}")


def wait_spans(
    otlp: OtlpReceiver, expect: dict[str, str], retried: str, timeout_s: float = 30
) -> None:
    """Until every task has a finished notify span (and the retried one two)."""

    def done(spans: list[ReceivedSpan]) -> bool:
        notify = [
            s.attributes.get("conveyor.task_id")
            for s in spans
            if s.service == "conveyor-notify" and s.name.startswith("process ")
        ]
        return set(expect) <= set(notify) and notify.count(retried) >= 2

    assert otlp.wait_for(done, timeout_s), "notify spans missing"


def scrape_settled(stack: LocalStack, prefix: str, timeout_s: float = 30) -> dict[str, str]:
    """/metrics of every service once preprocess has reported its (zero) lag on the ingress topic.

    Lag is refreshed every 10 s from the committed offsets and the high watermark.
    """
    deadline = time.monotonic() + timeout_s
    ingress = prefix + "conveyor.task.submitted"
    while True:
        texts = {name: proc.metrics() for name, proc in stack.procs.items()}
        lags = samples(texts["preprocess"], "conveyor_consumer_lag", topic=ingress)
        if lags and sum(lags) == 0:
            return texts
        if time.monotonic() > deadline:
            raise AssertionError(f"preprocess lag on {ingress} not settled to 0: {lags}")
        time.sleep(0.5)


def samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of the samples called `name` whose labels include `labels`."""
    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                out.append(sample.value)
    return out


def _records(store_url: str, expect: dict[str, str]) -> dict[str, TaskRecord | None]:
    store = open_store(store_url)
    try:
        return {task_id: store.get(task_id) for task_id in expect}
    finally:
        store.close()


def _tails(stack: LocalStack) -> str:
    return "\n".join(f"--- {p.label}\n{p.tail(15)}" for p in stack.procs.values())
