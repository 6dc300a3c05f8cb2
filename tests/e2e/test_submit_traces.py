"""Traces of tasks sent with `conveyor submit`, read from a real OTLP receiver.

400 tasks go through the CLI (a process of its own, tracing configured by the same `OTEL_*`
variables as the services) into preprocess, the cheapest hop, under
`parentbased_traceidratio` 0.25. The receiver must show: a quarter of the tasks traced (the
ratio applies to CLI submissions; ± 6 points), each traced task's trace with exactly one root
(the CLI's exported submit span) and no span whose parent is missing, the submit PRODUCER span
as the parent of preprocess's CONSUMER span, and no span at all for a task the sampler dropped.
Preprocess also records end-to-end latency for every task it finishes.
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

import pytest

from conveyor.local.otlp import OtlpReceiver, ReceivedSpan
from conveyor.local.stack import LocalStack
from tests.e2e.observability import samples, service_env

pytestmark = [pytest.mark.broker, pytest.mark.models]
TASKS = 400
RATIO = 0.25
TOLERANCE = 0.06
PRODUCER, CONSUMER = 4, 5  # OTLP SpanKind


@dataclass
class SubmitRun:
    trace_of: dict[str, str]  # task id -> trace id, as the CLI printed it
    spans: list[ReceivedSpan]
    preprocess_metrics: str
    prefix: str


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> SubmitRun:
    workdir = tmp_path_factory.mktemp("submit-traces")
    prefix = f"s{uuid.uuid4().hex[:8]}."
    with OtlpReceiver() as otlp:
        env = service_env(
            kafka_bootstrap, prefix, f"sqlite:///{workdir / 'conveyor.db'}", otlp.endpoint
        )
        env.update(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.25")
        stack = LocalStack(workdir, env, services=("preprocess",))
        stack.apply_topics()
        stack.start()
        try:
            trace_of = submit_with_cli(workdir, prefix, env)
            metrics = wait_consumed(stack, prefix, TASKS)
        finally:
            stack.stop()  # SIGTERM: preprocess flushes its last spans on the way out
        # The CLI flushed its spans before it exited; preprocess's arrive within 200 ms.
        otlp.wait_for(lambda spans: _settled(spans, trace_of), timeout_s=30)
        return SubmitRun(trace_of, otlp.spans(), metrics, prefix)


def submit_with_cli(workdir: Path, prefix: str, env: dict[str, str]) -> dict[str, str]:
    path = workdir / "tasks.jsonl"
    lines = [
        json.dumps(
            {"task_id": f"{prefix}t{n}", "tenant": "acme", "kind": "embed", "input": f"text {n}"}
        )
        for n in range(TASKS)
    ]
    path.write_text("\n".join(lines) + "\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor.cli.main", "submit", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **env},  # no OTEL_SERVICE_NAME: the CLI's default name is checked
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for line in proc.stdout.splitlines():
        task_id, _, trace = line.partition("\ttrace=")
        if trace:
            out[task_id] = trace
    assert len(out) == TASKS, proc.stdout[-2000:]
    return out


def wait_consumed(stack: LocalStack, prefix: str, count: int, timeout_s: float = 120) -> str:
    """Preprocess's /metrics once it has consumed `count` records from the ingress topic."""
    topic = prefix + "conveyor.task.submitted"
    deadline = time.monotonic() + timeout_s
    while True:
        text = stack.procs["preprocess"].metrics()
        if sum(samples(text, "conveyor_events_consumed_total", topic=topic)) >= count:
            return text
        assert not stack.supervise(), "preprocess died"
        if time.monotonic() > deadline:
            raise AssertionError(f"preprocess did not consume {count} in {timeout_s}s")
        time.sleep(0.5)


def _settled(spans: list[ReceivedSpan], trace_of: dict[str, str]) -> bool:
    """Every exported submit span has preprocess's consume span in its trace."""
    submitted = {s.trace_id for s in spans if s.name.startswith("submit ")}
    processed = {
        s.trace_id for s in spans if s.service == "conveyor-preprocess" and s.kind == CONSUMER
    }
    return bool(submitted) and submitted <= processed


def traced(run: SubmitRun) -> dict[str, list[ReceivedSpan]]:
    """The spans of each task whose trace reached the receiver, by task id."""
    by_trace: dict[str, list[ReceivedSpan]] = {}
    for span in run.spans:
        by_trace.setdefault(span.trace_id, []).append(span)
    return {task: by_trace[trace] for task, trace in run.trace_of.items() if trace in by_trace}


def test_the_sampler_ratio_applies_to_cli_submissions(run: SubmitRun) -> None:
    share = len(traced(run)) / TASKS
    assert RATIO - TOLERANCE <= share <= RATIO + TOLERANCE, share
    # What the receiver holds is exactly the CLI's tasks' traces: nothing else was traced.
    assert {s.trace_id for s in run.spans} == {spans[0].trace_id for spans in traced(run).values()}


def test_every_cli_task_trace_has_exactly_one_root_the_exported_submit_span(
    run: SubmitRun,
) -> None:
    for task_id, spans in traced(run).items():
        roots = [s for s in spans if s.parent_span_id is None]
        assert len(roots) == 1, (task_id, [(s.service, s.name) for s in roots])
        root = roots[0]
        assert root.service == "conveyor-submit" and root.kind == PRODUCER, root
        assert root.name == f"submit {run.prefix}conveyor.task.submitted"
        assert root.attributes["messaging.operation.name"] == "send"
        assert root.attributes["messaging.kafka.message.key"] == task_id
        ids = {s.span_id for s in spans}
        orphans = [s for s in spans if s.parent_span_id is not None and s.parent_span_id not in ids]
        assert not orphans, (task_id, orphans)


def test_producer_spans_parent_consumer_spans(run: SubmitRun) -> None:
    for task_id, spans in traced(run).items():
        by_id = {s.span_id: s for s in spans}
        consumers = [s for s in spans if s.kind == CONSUMER]
        assert len(consumers) == 1, (task_id, consumers)
        (consume,) = consumers
        parent = by_id[consume.parent_span_id or ""]
        assert parent.kind == PRODUCER and parent.service == "conveyor-submit", parent
        # Preprocess's own output has its producer span, child of the consume span.
        created = [s for s in spans if s.kind == PRODUCER and s.service == "conveyor-preprocess"]
        assert created and all(s.parent_span_id == consume.span_id for s in created), created
        assert all(s.name.startswith(f"create {run.prefix}conveyor.task.") for s in created)
        # The consumer starts after its producer began: no clock skew to correct.
        assert consume.start_ns >= parent.start_ns
        attrs = consume.attributes
        assert attrs["messaging.client.id"].startswith("conveyor-preprocess-"), attrs
        assert attrs["server.address"] == "127.0.0.1" and isinstance(attrs["server.port"], int)
        assert attrs["messaging.kafka.message.key"] == task_id
        for span in (consume, parent):
            assert span.resource["host.name"] and span.resource["service.instance.id"]


def test_preprocess_records_end_to_end_latency_for_every_task(run: SubmitRun) -> None:
    counts = samples(
        run.preprocess_metrics, "conveyor_e2e_latency_seconds_count", stage="preprocess"
    )
    assert sum(counts) >= TASKS, counts
