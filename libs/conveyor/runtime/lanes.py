"""Priority lanes: serve `high` before `normal` before `low`, without starving the lower lanes.

An event type published on several topics (the catalog lists `conveyor.task.preprocessed.high`,
`.normal`, `.low`) has priority lanes, in catalog order. Before each poll the stage looks at the
backlog of its assigned lane partitions (cached high watermark minus the consumer's position,
both local: no broker request): while a lane has a backlog, every lower lane's partitions are
paused. A lane paused for longer than `starvation_s` is left unpaused for a serving window,
so under a sustained flood of high-priority work lower lanes still move: a quarter of the
interval, held open until the lane has actually delivered a record (its fetch can take longer
than the window on a busy machine) but never longer than `starvation_s`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from confluent_kafka import KafkaException, TopicPartition

from conveyor.kafka.protocols import ConsumerClient

log = logging.getLogger(__name__)


def plan(
    lanes: Sequence[str],
    backlog: dict[str, int],
    paused_since: dict[str, float],
    serving_until: dict[str, float],
    now: float,
    starvation_s: float,
) -> set[str]:
    """The lanes to hold back: those below the highest lane with a backlog, except lanes in
    their serving window and lanes held back for `starvation_s` (their window opens now)."""
    top = next((i for i, lane in enumerate(lanes) if backlog.get(lane, 0) > 0), len(lanes))
    hold = set()
    for lane in lanes[top + 1 :]:
        if serving_until.get(lane, 0.0) > now:
            continue
        since = paused_since.get(lane)
        if since is not None and now - since >= starvation_s:
            continue  # starvation guard
        hold.add(lane)
    return hold


class LaneScheduler:
    def __init__(self, consumer: ConsumerClient, lanes: Sequence[str], starvation_s: float) -> None:
        self.consumer = consumer
        self.lanes = list(lanes)
        self.starvation_s = starvation_s
        self.paused_since: dict[str, float] = {}  # lane -> when it was last held back
        self.paused: set[tuple[str, int]] = set()  # lane partitions this scheduler paused
        self.serving_until: dict[str, float] = {}  # starved lane -> end of its serving window
        # starved lane -> (when its window opened, its position then): the window stays open
        # until the lane's position moves, up to starvation_s.
        self.opened: dict[str, tuple[float, int]] = {}

    def before_poll(self, now: float, skip: set[tuple[str, int]]) -> None:
        """Pause and resume lane partitions for the next poll; `skip` = retry-paused ones."""
        try:
            mine = [tp for tp in self.consumer.assignment() if tp.topic in self.lanes]
            if not mine:
                return
            backlog, position = self._backlog(mine)
            self._extend_windows(position, now)
            hold = plan(
                self.lanes,
                backlog,
                self.paused_since,
                self.serving_until,
                now,
                self.starvation_s,
            )
            for lane in self.paused_since:
                if lane not in hold and self.serving_until.get(lane, 0.0) <= now:
                    # A starved lane is served for a quarter of the starvation interval, or
                    # until it delivers (see _extend_windows).
                    self.serving_until[lane] = now + self.starvation_s / 4
                    self.opened[lane] = (now, position.get(lane, -1))
            self._apply(mine, hold, now, skip)
        except KafkaException as exc:
            log.warning("lane scheduling skipped error=%s", exc)

    def _extend_windows(self, position: dict[str, int], now: float) -> None:
        """Keep a starved lane's window open while it has not delivered a record yet."""
        for lane, (opened_at, at_open) in list(self.opened.items()):
            if self.serving_until.get(lane, 0.0) > now:
                continue
            if position.get(lane, -1) == at_open and now - opened_at < self.starvation_s:
                self.serving_until[lane] = now + min(0.05, self.starvation_s / 4)
            else:
                del self.opened[lane]

    def _backlog(self, partitions: list[TopicPartition]) -> tuple[dict[str, int], dict[str, int]]:
        """Per lane: records waiting (cached high watermark minus position), and the sum of
        its partitions' positions (which moves when the lane delivers)."""
        backlog: dict[str, int] = {}
        position: dict[str, int] = {}
        for tp in self.consumer.position(partitions):
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            # Before its first record a partition has no position: count from its start.
            start = tp.offset if tp.offset >= 0 else low
            if start >= 0 and high >= 0:
                backlog[tp.topic] = backlog.get(tp.topic, 0) + max(high - start, 0)
            position[tp.topic] = position.get(tp.topic, 0) + max(tp.offset, -1)
        return backlog, position

    def _apply(
        self, mine: list[TopicPartition], hold: set[str], now: float, skip: set[tuple[str, int]]
    ) -> None:
        to_pause = [
            tp
            for tp in mine
            if tp.topic in hold
            and (tp.topic, tp.partition) not in self.paused
            and (tp.topic, tp.partition) not in skip
        ]
        to_resume = [
            tp for tp in mine if tp.topic not in hold and (tp.topic, tp.partition) in self.paused
        ]
        if to_pause:
            self.consumer.pause(to_pause)
            self.paused.update((tp.topic, tp.partition) for tp in to_pause)
        if to_resume:
            self.consumer.resume(to_resume)
            self.paused.difference_update((tp.topic, tp.partition) for tp in to_resume)
        for lane in hold:
            self.paused_since.setdefault(lane, now)
        for lane in [lane for lane in self.paused_since if lane not in hold]:
            del self.paused_since[lane]

    def on_revoke(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """Lane partitions being revoked that this scheduler paused: librdkafka keeps a pause
        across revoke and re-assign, so the caller resumes them; they are forgotten here."""
        mine = [tp for tp in partitions if (tp.topic, tp.partition) in self.paused]
        self.paused.difference_update((tp.topic, tp.partition) for tp in mine)
        return mine
