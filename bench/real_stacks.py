"""The stacks bench/pipeline_real.py compares: one LocalStack per tracing configuration, each
with its own topic prefix, SQLite store, webhook receiver and submitter process; the tasks a
stack is given, and the wait until each one's webhook arrived.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from conveyor.local.receiver import WebhookReceiver
from conveyor.local.samples import MINILM_ONLY, PROFANE, SENTENCES
from conveyor.local.stack import LocalStack
from conveyor.webhooks import new_secret

# Each tenant its own secret (no shared default); the receiver is on loopback, so allowlisted.
SECRETS = {tenant: new_secret() for tenant in ("acme", "globex")}
LABELS = ["business", "weather", "culture", "infrastructure"]
POLL_S = 0.02  # webhook poll: the timing error per round is at most this
# The span exporter's schedule delay (default 5000 ms): a round's last spans leave within it, so
# the rounds need wait only this long for them. More, smaller exports than the default: if
# anything, more export cost per span than a deployment pays.
BSP_SCHEDULE_DELAY_MS = 1000
COUNTERS = (  # /metrics samples summed over a service's consumers
    "conveyor_batch_size_count",
    "conveyor_batch_size_sum",
    "conveyor_handler_duration_seconds_sum",
)


@dataclass
class BenchStack:
    name: str
    env: dict[str, str]
    workdir: Path
    stack: LocalStack | None = None
    hooks: WebhookReceiver | None = None
    submitter: BaseProcess | None = None
    conn: Connection | None = None
    seen: set[str] = field(default_factory=set)  # task ids whose webhook arrived
    expect: dict[str, str] = field(default_factory=dict)  # task id -> final status
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> None:
        self.hooks = WebhookReceiver(SECRETS).start()
        self.stack = LocalStack(self.workdir, self.env)
        self.stack.apply_topics()
        self.stack.start()
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.submitter = ctx.Process(target=run_submitter, args=(self.env, child), daemon=True)
        self.submitter.start()
        if not self.conn.poll(120):  # imports and a producer: seconds on a busy machine
            raise RuntimeError(f"{self.name}: submitter not ready")
        self.conn.recv()

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
        if self.hooks is not None:
            self.hooks.stop()
        if self.submitter is not None and self.conn is not None:
            with contextlib.suppress(OSError):  # it has exited already
                self.conn.send(None)
            self.submitter.join(30)
            if self.submitter.is_alive():
                self.submitter.terminate()

    def pids(self) -> dict[str, int]:
        """Service name -> process id; the submitter's under "submitter"."""
        assert self.stack is not None and self.submitter is not None
        pids = {n: p.proc.pid for n, p in self.stack.procs.items() if p.proc is not None}
        if self.submitter.pid is not None:
            pids["submitter"] = self.submitter.pid
        return pids

    def batch(self, n: int, label: str) -> list[dict[str, object]]:
        """`n` tasks: embed, one in ten classify, one in ten profane (moderation blocks it)."""
        assert self.hooks is not None
        tasks: list[dict[str, object]] = []
        for i in range(n):
            task: dict[str, object] = {
                "task_id": f"{self.name}-{label}-{i:05d}",
                "tenant": ["acme", "globex"][i % 2],
                "kind": "embed",
                "input": f"{SENTENCES[i % len(SENTENCES)]} (item {i})",
                "priority": ["high", "normal", "low"][i % 3],
                "callback_url": self.hooks.url,
            }
            if i % 10 == 8:
                task.update(kind="classify", input=SENTENCES[i % len(SENTENCES)], labels=LABELS)
            if i % 10 == 9:
                task.update(input=PROFANE[i % len(PROFANE)])
            self.expect[str(task["task_id"])] = "blocked" if i % 10 == 9 else "completed"
            tasks.append(task)
        return tasks

    def submit_and_wait(self, tasks: list[dict[str, object]], timeout_s: float) -> float:
        """Seconds from handing the tasks to the submitter until every one's webhook arrived."""
        assert self.conn is not None and self.hooks is not None and self.stack is not None
        want = {str(t["task_id"]) for t in tasks}
        cursor = len(self.hooks.deliveries)
        began = time.monotonic()
        self.conn.send(tasks)
        deadline = began + timeout_s
        while not want <= self.seen:
            deliveries = self.hooks.deliveries
            self.seen.update(d.task_id for d in deliveries[cursor:])
            cursor = len(deliveries)
            if time.monotonic() > deadline or self.stack.supervise():
                raise RuntimeError(f"{self.name}: tasks not done\n{tails(self.stack)}")
            time.sleep(POLL_S)
        elapsed = time.monotonic() - began
        if not self.conn.poll(timeout_s) or self.conn.recv() != len(tasks):
            raise RuntimeError(f"{self.name}: submitter did not confirm")
        return elapsed

    def stage_counters(self) -> dict[str, tuple[float, float, float]]:
        """Per service, from its /metrics: (batches, records in them, handler seconds) so far."""
        assert self.stack is not None
        out = {}
        for service, proc in self.stack.procs.items():
            totals = dict.fromkeys(COUNTERS, 0.0)
            for family in text_string_to_metric_families(proc.metrics()):
                for sample in family.samples:
                    if sample.name in totals:
                        totals[sample.name] += sample.value
            out[service] = (totals[COUNTERS[0]], totals[COUNTERS[1]], totals[COUNTERS[2]])
        return out


def bench_stacks(
    bootstrap: str, otlp: str, run: str, root: Path, *, sampled: bool, control: bool = False
) -> list[BenchStack]:
    """`untraced`, `traced` (always on) and, if `sampled`, a parent-based 10% stack.

    With `control`, a second untraced stack (`control`) stands in for `traced`: an A/A run,
    whose "slowdown" is what the bench cannot tell from noise on this machine.
    """
    traced = {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": str(BSP_SCHEDULE_DELAY_MS),
    }
    untraced = {"OTEL_SDK_DISABLED": "true"}
    envs = {"untraced": untraced, "control": untraced} if control else {"untraced": untraced}
    if not control:
        envs["traced"] = traced
    if sampled:  # what a production deployment runs: the root traces one task in ten
        envs["sampled"] = {
            **traced,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        }
    out = []
    for name, otel in envs.items():
        workdir = root / name
        env = {
            "CONVEYOR_KAFKA_BOOTSTRAP": bootstrap,
            "CONVEYOR_TOPIC_PREFIX": f"r{run}-{name}.",
            "CONVEYOR_STORE_URL": f"sqlite:///{workdir / 'conveyor.db'}",
            "CONVEYOR_WEBHOOK_SECRETS": json.dumps(SECRETS),
            "CONVEYOR_WEBHOOK_ALLOW": "127.0.0.1/32",
            "CONVEYOR_MODELS": MINILM_ONLY,
            **otel,
        }
        out.append(BenchStack(name, env, workdir))
    return out


def run_submitter(env: dict[str, str], conn: Connection) -> None:
    """Process entry: submit each list of tasks received, answer with how many, until None.

    A `TaskClient` with the stack's OTEL_* settings, as a traced gateway would be: its root
    span makes the sampling decision every stage follows.
    """
    os.environ.update({**env, "OTEL_SERVICE_NAME": "conveyor-submit"})
    from conveyor.client import TaskClient
    from conveyor.settings import KafkaSettings
    from conveyor.telemetry import tracing

    tracing.init_tracing("submit")
    client = TaskClient(KafkaSettings(), source="/bench")
    conn.send(0)  # ready
    while (tasks := conn.recv()) is not None:
        client.submit_many(tasks)
        conn.send(len(tasks))
    tracing.shutdown_tracing()


def tails(stack: LocalStack) -> str:
    return "\n".join(f"--- {p.label}\n{p.tail(15)}" for p in stack.procs.values())
