"""A pipelined stage with a slow batch handler, as processes against the real broker: it keeps
committing in order through a rebalance, and a kill -9 mid-batch loses nothing."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from tests.eventdata import inferred_record
from tests.support import apply, produce_raw, read_topics

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[2]
RECORDS = 400


class SlowStage:
    def __init__(self, env: dict[str, str], log: Path, index: int) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.integration.slowstage"],
                env={**os.environ, **env, "CONVEYOR_INSTANCE_ID": f"slow-{index}"},
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def slow_env(kafka_bootstrap: str, topic_prefix: str) -> dict[str, str]:
    apply(kafka_bootstrap, topic_prefix, partitions=4)
    path = os.pathsep.join([str(ROOT / "libs"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {
        "PYTHONPATH": path,
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_PIPELINED": "true",
        "CONVEYOR_BATCH_MAX": "8",
        "CONVEYOR_MAX_IN_FLIGHT": "32",
        "CONVEYOR_LOG_LEVEL": "WARNING",
        "OTEL_SDK_DISABLED": "true",
        "SLOW_STAGE_BATCH_S": "0.1",
    }


@pytest.fixture
def running() -> Iterator[list[SlowStage]]:
    procs: list[SlowStage] = []
    yield procs
    for proc in procs:
        proc.stop()


def _outputs(bootstrap: str, prefix: str, expect: int, timeout_s: float) -> list[str]:
    out = read_topics(
        bootstrap, [prefix + "conveyor.task.moderated"], expect=expect, timeout_s=timeout_s
    )
    return [m.key().decode() for m in out]


def _wait_outputs(bootstrap: str, prefix: str, at_least: int, timeout_s: float) -> list[str]:
    """Every output key so far (duplicates included) once `at_least` distinct ones are in."""
    deadline = time.monotonic() + timeout_s
    while True:
        keys = _outputs(bootstrap, prefix, 10**9, 3)  # all there is after 3 s
        if len(set(keys)) >= at_least:
            return keys
        assert time.monotonic() < deadline, f"fewer than {at_least} outputs in {timeout_s}s"


def test_pipelined_slow_stage_commits_in_order_through_a_rebalance_and_a_kill_9(
    kafka_bootstrap: str,
    topic_prefix: str,
    slow_env: dict[str, str],
    running: list[SlowStage],
    tmp_path: Path,
) -> None:
    ids = [f"slow-{i:03d}" for i in range(RECORDS)]
    inferred = topic_prefix + "conveyor.task.inferred"
    produce_raw(kafka_bootstrap, inferred, map(inferred_record, ids))
    first = SlowStage(slow_env, tmp_path / "first.log", 0)
    running.append(first)
    _wait_outputs(kafka_bootstrap, topic_prefix, 40, 90)
    second = SlowStage(slow_env, tmp_path / "second.log", 1)  # a rebalance under load
    running.append(second)
    _wait_outputs(kafka_bootstrap, topic_prefix, 150, 90)
    first.kill()  # mid-batch: its handler sleeps through most of every moment
    keys = _wait_outputs(kafka_bootstrap, topic_prefix, RECORDS, 120)
    assert set(keys) == set(ids), second.tail()  # nothing lost

    # Order: per input partition, each record's first output comes in input order.
    where = {
        m.key().decode(): (m.partition(), m.offset()) for m in _read(kafka_bootstrap, inferred)
    }
    seen: dict[int, list[int]] = collections.defaultdict(list)
    for key in dict.fromkeys(keys):  # first occurrences, in the order read
        partition, offset = where[key]
        seen[partition].append(offset)
    # read_topics reads several output partitions interleaved: compare within each partition
    # of the input, whose records all land on one output partition (same key, same count).
    assert all(offsets == sorted(offsets) for offsets in seen.values())

    # Every output can be seen before the killed stage's partitions reach the survivor: the
    # killed one had emitted records it had not committed yet (commits are at most every 100
    # ms). The survivor takes them over once the broker expires the dead member, redoes them
    # and commits; wait for that outcome (bounded), then stop it and check the final commit.
    group = topic_prefix + "conveyor.moderation"
    highs = {p: n for p, n in collections.Counter(where[k][0] for k in ids).items()}
    deadline = time.monotonic() + 120
    while _committed(kafka_bootstrap, group, inferred) != highs and time.monotonic() < deadline:
        time.sleep(0.5)
    assert second.stop() == 0, second.tail()
    committed = _committed(kafka_bootstrap, group, inferred)
    assert committed == highs, second.tail()  # every record committed, through the last one


def _read(bootstrap: str, topic: str) -> list[object]:
    return read_topics(bootstrap, [topic], expect=RECORDS, timeout_s=30)  # type: ignore[return-value]


def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = [TopicPartition(topic, p) for p in range(4)]
        return {tp.partition: tp.offset for tp in probe.committed(parts, timeout=10)}
    finally:
        probe.close()
