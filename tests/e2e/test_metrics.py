"""Every service's /metrics after a traced end-to-end run: counters match the tasks, the
exposition passes `promtool check metrics`.

Reads the run that tests/e2e/test_tracing.py also reads (one stack start for both). In the run:
13 tasks through the whole pipeline (one of them notified on the second attempt) and one task
that preprocess rejects (dead letter, `failed` status, still notified).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from tests.e2e.observability import ObservedRun, samples, shared_run

pytestmark = [pytest.mark.broker, pytest.mark.models]
STAGES = ("preprocess", "inference", "moderation", "writeback", "notify")


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> ObservedRun:
    return shared_run(kafka_bootstrap, tmp_path_factory)


def total(run: ObservedRun, service: str, name: str, **labels: str) -> float:
    return sum(samples(run.metrics[service], name, stage=service, **labels))


def test_consumed_and_emitted_counters_match_the_tasks(run: ObservedRun) -> None:
    n = len(run.expect)
    ok = n - 1  # the invalid task stops at preprocess
    consumed = "conveyor_events_consumed_total"
    emitted = "conveyor_events_emitted_total"
    assert total(run, "preprocess", consumed, topic=run.topic("conveyor.task.submitted")) == n
    lanes = sum(
        total(run, "preprocess", emitted, topic=run.topic(f"conveyor.task.{lane}"))
        for lane in ("preprocessed.high", "preprocessed.normal", "preprocessed.low")
    )
    assert lanes == ok
    assert total(run, "inference", emitted, topic=run.topic("conveyor.task.inferred")) == ok
    assert total(run, "moderation", emitted, topic=run.topic("conveyor.task.moderated")) == ok
    assert total(run, "writeback", emitted, topic=run.topic("conveyor.task.stored")) == n
    assert total(run, "notify", consumed, topic=run.topic("conveyor.task.stored")) == n
    assert total(run, "notify", emitted, topic=run.topic("conveyor.task.notified")) == n
    # Status events: the dead letter's `failed` and the notify retry's `retrying`.
    status = run.topic("conveyor.task.status")
    assert total(run, "preprocess", emitted, topic=status) == 1
    assert total(run, "notify", emitted, topic=status) == 1


def test_retries_by_rung_and_dead_letters_by_reason(run: ObservedRun) -> None:
    assert total(run, "notify", "conveyor_retries_total", rung="1") == 1
    assert (
        total(
            run,
            "notify",
            "conveyor_events_consumed_total",
            topic=run.topic("conveyor.notify.retry.1"),
        )
        == 1
    )
    assert total(run, "preprocess", "conveyor_dead_letters_total", reason="permanent_error") == 1
    assert (
        total(
            run,
            "preprocess",
            "conveyor_events_emitted_total",
            topic=run.topic("conveyor.preprocess.dlq"),
        )
        == 1
    )
    for stage in ("inference", "moderation"):
        assert total(run, stage, "conveyor_retries_total") == 0
    for stage in ("inference", "moderation", "writeback", "notify"):
        assert total(run, stage, "conveyor_dead_letters_total") == 0


def test_histograms_and_gauges_are_updated(run: ObservedRun) -> None:
    n = len(run.expect)
    for stage in STAGES:
        assert total(run, stage, "conveyor_batch_size_sum") >= 1, stage
        assert total(run, stage, "conveyor_handler_duration_seconds_count") >= 1, stage
        # Idle after the run: nothing in flight, nothing paused (the retry rung resumed).
        assert samples(run.metrics[stage], "conveyor_in_flight", stage=stage) == [0], stage
        assert samples(run.metrics[stage], "conveyor_paused_partitions", stage=stage) == [0]
    # notify finishes every task: one end-to-end latency per task (a failed attempt has none).
    assert total(run, "notify", "conveyor_e2e_latency_seconds_count") == n
    assert total(run, "notify", "conveyor_e2e_latency_seconds_sum") > 0
    # preprocess too, from the submitted event's time: every task but the one it dead-letters.
    assert total(run, "preprocess", "conveyor_e2e_latency_seconds_count") == n - 1
    assert total(run, "preprocess", "conveyor_batch_size_sum") == n
    # Consumer lag per partition, from the committed offsets and the high watermark.
    lags = samples(
        run.metrics["preprocess"],
        "conveyor_consumer_lag",
        stage="preprocess",
        topic=run.topic("conveyor.task.submitted"),
    )
    assert len(lags) == 3 and sum(lags) == 0, lags
    gpu = samples(run.metrics["inference"], "conveyor_gpu_memory_bytes", stage="inference")
    assert bool(gpu) == torch.cuda.is_available(), gpu  # CPU machine: no GPU series at all


def test_every_exposition_passes_promtool(run: ObservedRun) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool not found: install Debian's `prometheus` package "
            "(deploy/tools/install-tools.sh)",
            pytrace=False,
        )
    for stage in STAGES:
        proc = subprocess.run(
            [promtool, "check", "metrics"],
            input=run.metrics[stage],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (
            stage,
            proc.stdout,
            proc.stderr,
        )
