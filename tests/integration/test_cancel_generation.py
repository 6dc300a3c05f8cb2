"""A generation cancelled mid-way stops within one token step: the real SmolLM2 model, the real
broker, the real canceller and cancel watch (issue 11, cancellation).

The cancel goes the way the gateway sends it (store, then the cancel topic, acknowledged); the
stage's watch reads it on its own thread while the model generates on this one, and the
generation's stopping criterion, which reads the task's flag after every token, finishes the
task at the first token after the cancel became visible.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conveyor.cancel import Canceller, CancelWatch
from conveyor.ml.generator import GenParams
from conveyor.ml.registry import ModelRegistry
from conveyor.settings import KafkaSettings
from conveyor.store import TaskUpdate, open_store
from tests.support import apply

pytestmark = [pytest.mark.broker, pytest.mark.models, pytest.mark.timeout(300)]

PROMPT = "Count from 1 to 500, separated by commas."
BUDGET = 200


def test_a_generation_cancelled_mid_way_stops_within_one_token_step(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    apply(kafka_bootstrap, topic_prefix)
    settings = KafkaSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix)
    store = open_store(f"sqlite:///{tmp_path / 'conveyor.db'}")
    store.apply(
        TaskUpdate(
            task_id="g-1",
            event_id="g-1-preprocessed",
            event_type="conveyor.task.preprocessed.v1",
            status="processing",
            time=datetime.now(UTC),
            tenant="acme",
            kind="generate",
        )
    )
    generator = ModelRegistry.from_json(None).for_kind("generate")
    watch = CancelWatch(settings, name="inference-test")
    assert watch.start(wait_s=60)
    reads: list[tuple[float, bool]] = []  # one per token step: (when, the flag's answer)

    def flag() -> bool:
        now = time.monotonic()  # before the lookup: a read from `visible` on sees the cancel
        answer = watch.contains("acme", "g-1")
        reads.append((now, answer))
        return answer

    texts: list[str] = []
    worker = threading.Thread(
        target=lambda: texts.extend(
            generator.generate([PROMPT], [GenParams(max_new_tokens=BUDGET)], cancelled=[flag])
        )
    )
    canceller = Canceller(settings, store, by="cli")
    try:
        worker.start()
        deadline = time.monotonic() + 120
        while len(reads) < 8 and time.monotonic() < deadline:  # well into the generation
            time.sleep(0.01)
        assert len(reads) >= 8, "the generation did not start"
        asked = time.monotonic()
        answer = canceller.cancel("g-1", "acme")
        acknowledged = time.monotonic()
        assert answer is not None and answer.cancelled
        worker.join(120)
        assert not worker.is_alive()
    finally:
        canceller.close()
        watch.stop()
        store.close()
    visible = watch.visible_at("acme", "g-1")
    assert visible is not None
    stopped_at = len(reads)
    assert reads[-1][1] and not any(answer for _, answer in reads[:-1])
    after_visible = sum(1 for when, _ in reads if when >= visible)
    assert after_visible <= 1, (after_visible, len(reads))  # within one token step
    assert stopped_at < BUDGET
    tokens = generator.count_tokens(texts[0])
    assert tokens <= stopped_at + 1, (tokens, stopped_at)  # the text ends where it stopped
    step_s = (reads[-2][0] - reads[0][0]) / max(1, len(reads) - 2)
    print(
        f"\ncancel mid-generation: stopped at token {stopped_at}/{BUDGET}; cancel asked -> "
        f"acknowledged {1000 * (acknowledged - asked):.1f} ms, -> visible in the watch "
        f"{1000 * (visible - asked):.1f} ms; tokens after visible {after_visible}; "
        f"token step {1000 * step_s:.1f} ms"
    )
