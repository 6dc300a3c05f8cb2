"""The retry ladder, rebalances and exactly-once mode against the real broker.

Stages run in-process as `StageRunner` threads with small test handlers (stage `moderation`,
consuming `conveyor.task.inferred.v1`) that decide by `event.attempt`, the retry state carried in
the event, never by counters of their own. Exactly-once needs a crash, so it runs preprocess as
a process (`ServiceProcess`) with `CONVEYOR_FAILPOINT`.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Message

from conveyor.errors import RetryableError
from conveyor.events.model import Event, event_id
from conveyor.local.process import ServiceProcess
from conveyor.runtime import Emit, StageContext, StageService
from conveyor.runtime.stage import StageRunner
from conveyor.settings import StageSettings
from tests.eventdata import INFERRED, MODERATED, MODERATED_TOPIC, inferred_record
from tests.support import apply, headers_of, produce_raw, produce_structured, read_topics, task_doc

pytestmark = pytest.mark.broker
STATUS_TOPIC = "conveyor.task.status"
# Retries are due within ±20% of the rung's delay, plus this absolute slack: the loop checks its
# timers once per idle poll (poll_timeout_ms = 100 ms) and the resumed partition's fetch adds a
# broker round trip.
DUE_SLACK_S = 0.15
LATE_SLACK_S = 1.0


@dataclass(frozen=True, slots=True)
class Call:
    at: float  # wall clock (time.time()), comparable with Kafka timestamps
    runner: str
    task_id: str
    attempt: int


@dataclass
class Harness:
    """Test stages running as threads, and the calls their handlers saw."""

    bootstrap: str
    prefix: str
    calls: list[Call] = field(default_factory=list)
    threads: list[tuple[StageRunner, threading.Thread]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def start(self, name: str, fails: Callable[[Event], bool], delays: list[float]) -> StageRunner:
        """A moderation stage whose handler raises RetryableError while `fails(event)`."""

        def handle(event: Event, _ctx: StageContext[StageSettings]) -> Emit:
            self.calls.append(Call(time.time(), name, event.subject or "", event.attempt))
            if fails(event):
                raise RetryableError(f"transient failure at attempt {event.attempt}")
            return Emit(MODERATED, moderated(event))

        service = StageService("moderation", StageSettings, handle=handle, accepts=(INFERRED,))
        settings = StageSettings(
            stage="moderation",
            kafka_bootstrap=self.bootstrap,
            topic_prefix=self.prefix,
            retry_delays=delays,
            batch_max=50,
        )
        runner = StageRunner(service, settings)
        thread = threading.Thread(target=self._run, args=(runner,), name=name, daemon=True)
        thread.start()
        self.threads.append((runner, thread))
        return runner

    def _run(self, runner: StageRunner) -> None:
        try:
            runner.run()
        except BaseException as exc:  # surfaced by stop()
            self.errors.append(exc)

    def stop(self, runner: StageRunner) -> None:
        for r, thread in self.threads:
            if r is runner:
                r.stop()
                thread.join(30)
                assert not thread.is_alive(), "stage did not stop within 30 s"
        assert not self.errors, self.errors

    def stop_all(self) -> None:
        for runner, _ in self.threads:
            self.stop(runner)

    def produce(self, task_ids: list[str]) -> None:
        produce_raw(
            self.bootstrap,
            self.prefix + "conveyor.task.inferred",
            [inferred_record(t) for t in task_ids],
        )

    def wait_for(self, what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def called(self, task_id: str, attempt: int) -> Call | None:
        return next((c for c in self.calls if c.task_id == task_id and c.attempt == attempt), None)

    def read(self, topic: str, expect: int, *, settle_s: float = 0.5) -> list[Message]:
        return read_topics(
            self.bootstrap, [self.prefix + topic], expect=expect, timeout_s=30, settle_s=settle_s
        )


def moderated(event: Event) -> dict[str, object]:
    data = dict(event.data)
    return {
        "task": data["task"],
        "model": data["model"],
        "text": data["text"],
        "embedding": None,
        "label": None,
        "label_scores": {},
        "verdict": "allow",
        "scores": {},
        "reasons": [],
    }


@pytest.fixture
def harness(kafka_bootstrap: str, topic_prefix: str) -> Iterator[Harness]:
    apply(kafka_bootstrap, topic_prefix)
    h = Harness(kafka_bootstrap, topic_prefix)
    yield h
    h.stop_all()


def by_task(msgs: list[Message]) -> dict[str, list[Message]]:
    out: dict[str, list[Message]] = collections.defaultdict(list)
    for msg in msgs:
        out[(msg.key() or b"").decode()].append(msg)
    return out


def status_events(harness: Harness, expect: int) -> dict[str, list[tuple[str, int]]]:
    from conveyor.events.avro import default_schemas
    from conveyor.events.codec import decode

    out: dict[str, set[tuple[str, int]]] = collections.defaultdict(set)
    for msg in harness.read(STATUS_TOPIC, expect):
        data = decode(msg.headers(), msg.value(), default_schemas()).data
        out[data["task_id"]].add((data["status"], data["attempt"]))  # dedup by content
    return {k: sorted(v) for k, v in out.items()}


def test_transient_failure_completes_via_both_rungs_and_persistent_failure_dead_letters(
    harness: Harness,
) -> None:
    flaky = [f"flaky-{i}" for i in range(4)]
    doomed = [f"doomed-{i}" for i in range(3)]
    originals = {t: inferred_record(t)[1] for t in flaky + doomed}
    harness.produce(flaky + doomed)
    harness.start("a", lambda e: e.subject in doomed or e.attempt < 2, delays=[0.5, 1.0])

    out = harness.read(MODERATED_TOPIC, expect=len(flaky))
    assert sorted(by_task(out)) == flaky
    assert {headers_of(m)["ce_id"] for m in out} == {
        event_id(t, MODERATED, tenant="acme") for t in flaky
    }
    dlq = by_task(harness.read("conveyor.moderation.dlq", expect=len(doomed)))
    assert sorted(dlq) == doomed
    for task_id, (dead,) in dlq.items():
        h = headers_of(dead)
        assert h["conveyor_error_attempts"] == "3"  # rungs + 1
        assert h["ce_attempt"] == "2"  # the record as consumed from the last rung, untouched
        assert h["conveyor_error_class"] == "RetryableError"
        assert h["conveyor_original_topic"] == harness.prefix + "conveyor.task.inferred"
        assert dead.value() == originals[task_id]
    for rung in (1, 2):
        records = by_task(harness.read(f"conveyor.moderation.retry.{rung}", expect=7))
        assert sorted(records) == sorted(flaky + doomed)
        for task_id, (record,) in records.items():
            assert headers_of(record)["ce_attempt"] == str(rung)
            assert record.value() == originals[task_id]
    status = status_events(harness, expect=2 * 7 + len(doomed))
    for task_id in flaky:
        assert status[task_id] == [("retrying", 1), ("retrying", 2)]
    for task_id in doomed:
        assert status[task_id] == [("failed", 3), ("retrying", 1), ("retrying", 2)]
    for task_id in flaky + doomed:
        assert sorted(c.attempt for c in harness.calls if c.task_id == task_id) == [0, 1, 2]


def test_retries_are_due_on_time_while_fresh_input_keeps_flowing(harness: Harness) -> None:
    # Seconds, not fractions: ±20% of 1 s is less than a resumed fetch can take on a busy CI
    # machine; the contract is relative, so longer rungs test it with less noise.
    delays = [2.0, 4.0]
    harness.start("a", lambda e: e.subject == "slow" and e.attempt < 2, delays=delays)
    harness.produce(["slow"])
    harness.wait_for("first failure", lambda: harness.called("slow", 0) is not None)
    harness.produce([f"fresh-a{i}" for i in range(5)])  # while rung 1 waits
    harness.wait_for("second failure", lambda: harness.called("slow", 1) is not None)
    harness.produce([f"fresh-b{i}" for i in range(5)])  # while rung 2 waits
    harness.read(MODERATED_TOPIC, expect=11)
    written = {
        rung: by_task(harness.read(f"conveyor.moderation.retry.{rung}", expect=1, settle_s=0))[
            "slow"
        ][0].timestamp()[1]
        / 1000
        for rung in (1, 2)
    }
    for rung, delay in enumerate(delays, start=1):
        retried = harness.called("slow", rung)
        assert retried is not None
        waited = retried.at - written[rung]
        # Never early; late only by what a loaded machine adds (a resumed fetch, a busy core).
        assert -DUE_SLACK_S <= waited - delay <= 0.5 * delay + LATE_SLACK_S, (rung, waited)
        wave = [c for c in harness.calls if c.task_id.startswith(f"fresh-{'ab'[rung - 1]}")]
        assert len(wave) == 5
        # Handled before the retried record was even due: the paused rung blocked nothing.
        assert max(c.at for c in wave) < written[rung] + delay


def test_rebalance_during_retries_ends_every_task_exactly_once_within_budget(
    harness: Harness,
) -> None:
    delays = [2.0, 3.0]
    # i % 3 of a task: 0 always fails (dead letter), 1 fails once, 2 fails twice.
    need: dict[str, int] = {}
    fails: Callable[[Event], bool] = lambda e: e.attempt < need[e.subject or ""]  # noqa: E731

    def wave(name: str, n: int, budgets: tuple[int, ...] = (99, 1, 2)) -> list[str]:
        tasks = [f"{name}-{i:02d}" for i in range(n)]
        need.update({t: budgets[i % len(budgets)] for i, t in enumerate(tasks)})
        harness.produce(tasks)
        return tasks

    harness.start("a", fails, delays)
    first = wave("w1", 12)
    harness.wait_for(
        "rung 2 entered", lambda: all(harness.called(t, 1) for t in first if need[t] >= 2)
    )
    second = wave("w2", 12)
    harness.wait_for("w2 first tries", lambda: all(harness.called(t, 0) for t in second))
    # Both rungs now wait in `a` (most of its 9 partitions paused): `b` takes some over.
    b = harness.start("b", fails, delays)
    harness.wait_for(
        "b retries some", lambda: any(c.runner == "b" and c.attempt > 0 for c in harness.calls)
    )
    harness.stop(b)  # leaves: its partitions, paused or not, go back to `a`
    # Fresh tasks on every rung partition after the partitions came back to `a`.
    third = wave("w3", 12, budgets=(99, 2))
    tasks = first + second + third

    completed = sorted(t for t in tasks if need[t] < 3)
    dead = sorted(t for t in tasks if need[t] == 99)
    out = by_task(harness.read(MODERATED_TOPIC, expect=len(completed), settle_s=1.0))
    dlq = by_task(harness.read("conveyor.moderation.dlq", expect=len(dead), settle_s=1.0))
    assert sorted(out) == completed and sorted(dlq) == dead  # each ends once, the right way
    for task_id, records in out.items():  # a redelivery is the same event
        assert {headers_of(m)["ce_id"] for m in records} == {
            event_id(task_id, MODERATED, tenant="acme")
        }
    for task_id, records in dlq.items():
        assert {headers_of(m)["ce_id"] for m in records} == {event_id(task_id, INFERRED)}
        assert {headers_of(m)["conveyor_error_attempts"] for m in records} == {"3"}
    for rung in (1, 2):
        climbed = sorted(t for t in tasks if need[t] >= rung)
        records = by_task(
            harness.read(f"conveyor.moderation.retry.{rung}", expect=len(climbed), settle_s=1.0)
        )
        assert sorted(records) == climbed
        for msgs in records.values():  # never beyond its budget, one attempt per rung
            assert {headers_of(m)["ce_attempt"] for m in msgs} == {str(rung)}
    assert max(c.attempt for c in harness.calls) <= len(delays)
    assert {c.runner for c in harness.calls} == {"a", "b"}


def lanes_of(env: dict[str, str]) -> list[str]:
    return [
        env["CONVEYOR_TOPIC_PREFIX"] + "conveyor.task.preprocessed." + lane
        for lane in ("high", "normal", "low")
    ]


def count_uncommitted(bootstrap: str, topics: list[str], *, at_least: int) -> int:
    """Records a read_uncommitted reader sees (aborted transactions included)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"dirty-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
        }
    )
    consumer.subscribe(topics)
    seen, deadline = 0, time.monotonic() + 20
    try:
        while time.monotonic() < deadline and seen <= at_least:
            seen += sum(1 for m in consumer.consume(500, 0.2) if m.error() is None)
    finally:
        consumer.close()
    return seen


def run_until_crash(env: dict[str, str], workdir: Path, n: int) -> tuple[list[Message], float]:
    """Crash preprocess mid-way, restart the same slot; outputs read_committed, and the time."""
    lanes = lanes_of(env)
    crashing = ServiceProcess(
        "preprocess", {**env, "CONVEYOR_FAILPOINT": "exit-before-commit:2"}, workdir
    )
    crashing.start()
    assert crashing.proc is not None
    assert crashing.proc.wait(60) == 86, crashing.tail()
    started = time.monotonic()
    crashing.env.pop("CONVEYOR_FAILPOINT")
    crashing.start()  # the same slot, as a supervisor restarts it
    try:
        out = read_topics(
            env["CONVEYOR_KAFKA_BOOTSTRAP"], lanes, expect=n, timeout_s=50, settle_s=1.0
        )
    finally:
        crashing.stop()
    return out, time.monotonic() - started


@pytest.mark.parametrize("exactly_once", [True, False], ids=["exactly-once", "at-least-once"])
def test_crash_before_commit_yields_each_output_once_only_with_transactions(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, exactly_once: bool
) -> None:
    apply(kafka_bootstrap, topic_prefix)
    tasks = [f"eos-{i:03d}" for i in range(120)]
    produce_structured(
        kafka_bootstrap, topic_prefix + "conveyor.task.submitted", [task_doc(t) for t in tasks]
    )
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_TOKENIZERS": "false",
        "CONVEYOR_LOG_LEVEL": "WARNING",
        "OTEL_SDK_DISABLED": "true",
        "CONVEYOR_BATCH_MAX": "30",
        "CONVEYOR_EXACTLY_ONCE": str(exactly_once).lower(),
    }
    out, elapsed = run_until_crash(env, tmp_path, len(tasks))
    counts = collections.Counter((m.key() or b"").decode() for m in out)
    assert set(counts) == set(tasks)  # none missing
    ids = {(m.key() or b"").decode(): headers_of(m)["ce_id"] for m in out}
    assert all(ids[t] == event_id(t, "conveyor.task.preprocessed.v1", tenant="acme") for t in tasks)
    duplicated = [t for t, c in counts.items() if c > 1]
    if exactly_once:
        assert duplicated == []  # the crashed transaction was aborted, its batch redone once
        # ...and it did write that batch's outputs before the crash: only aborted, not absent.
        assert count_uncommitted(kafka_bootstrap, lanes_of(env), at_least=len(tasks)) > len(tasks)
        # The restart fenced the open transaction at once: read_committed readers were not
        # blocked until transaction.timeout.ms (60 s).
        assert elapsed < 30, elapsed
    else:
        assert 0 < len(duplicated) <= 30  # the acknowledged, uncommitted batch came again
