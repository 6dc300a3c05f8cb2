"""The gateway's view of the streams in progress, and what each WebSocket is told of them.

`StreamHub` keeps, per task (tenant, task id), the partial text of its latest run, rebuilt from
the chunks the feed reads; bounded in count and age, because a gateway replica reads every
task's chunks. A `Subscription` is one WebSocket's cursor: it remembers what it has sent and,
when woken, sends only the difference, so a slow client gets fewer, larger chunks instead of an
unbounded queue, and a socket opened mid-stream first gets all the text so far as one chunk.

Everything here runs on the event loop's thread (the feed hands chunks over with
`call_soon_threadsafe`), so nothing needs a lock.

Messages on the WebSocket, beside the status messages:
- `{"type": "chunk", "task_id", "offset", "text"}`: the reader keeps
  `text = text[:offset] + message.text` (offsets count Unicode code points);
- `{"type": "stream_end", "task_id", "reason"}`: `complete`, `moderation` (the gate stopped
  showing partial text; the task goes on) or `interrupted`. A retried task may start again with
  a chunk at offset 0. The final status message carries the result either way.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from conveyor.streaming.chunks import INTERRUPTED, Chunk
from conveyor.streaming.gate import common_prefix

Key = tuple[str, str]  # (tenant, task id)


@dataclass(slots=True)
class StreamState:
    """One task's latest run as this replica has read it."""

    run: str
    text: str = ""
    next_seq: int = 0
    end: str | None = None
    touched: float = 0.0


class StreamHub:
    def __init__(
        self, *, max_tasks: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_tasks = max_tasks
        self.ttl_s = ttl_s
        self.clock = clock
        self.streams: OrderedDict[Key, StreamState] = OrderedDict()  # least recently touched first
        self.watchers: dict[Key, set[Subscription]] = {}

    def apply(self, chunks: Iterable[Chunk]) -> None:
        """Take chunks in their partition order; wake the sockets whose stream changed."""
        now = self.clock()
        changed: set[Key] = set()
        for chunk in chunks:
            if self._apply(chunk, now):
                changed.add(chunk.key)
        for key in changed:
            for sub in self.watchers.get(key, ()):
                sub.changed.set()
        self._expire(now)

    def subscribe(self, tenant: str, task_id: str) -> Subscription:
        sub = Subscription(self, (tenant, task_id))
        self.watchers.setdefault(sub.key, set()).add(sub)
        if sub.key in self.streams:
            sub.changed.set()  # a stream already under way: send what there is at once
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self.watchers.get(sub.key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.watchers[sub.key]

    def _apply(self, chunk: Chunk, now: float) -> bool:
        state = self.streams.get(chunk.key)
        if state is None or state.run != chunk.run:
            # A run is followed from its first chunk, which replaces any earlier run's text (a
            # retry starts again). A run first seen mid-way cannot be rebuilt, and the rest of
            # a superseded run (two instances briefly running one task) is ignored.
            if chunk.seq != 0:
                return False
            state = StreamState(run=chunk.run)
        elif state.end is not None or chunk.seq < state.next_seq:
            return False  # an ended run, or a chunk read twice
        if chunk.seq > state.next_seq or chunk.offset > len(state.text):
            state.end = INTERRUPTED  # a chunk is missing: what follows cannot be placed
        else:
            state.text = state.text[: chunk.offset] + chunk.text
            state.end = chunk.end
        state.next_seq = chunk.seq + 1
        state.touched = now
        self.streams[chunk.key] = state
        self.streams.move_to_end(chunk.key)
        return True

    def _expire(self, now: float) -> None:
        while self.streams:
            key, oldest = next(iter(self.streams.items()))
            if len(self.streams) <= self.max_tasks and now - oldest.touched < self.ttl_s:
                return
            del self.streams[key]


class Subscription:
    """One WebSocket's cursor on one task's stream."""

    def __init__(self, hub: StreamHub, key: Key) -> None:
        self.hub = hub
        self.key = key
        self.changed = asyncio.Event()
        self.run: str | None = None
        self.sent = ""
        self.told_end = False

    def messages(self) -> list[dict[str, Any]]:
        """What this socket has not been told yet: a chunk, a stream end, both or nothing."""
        self.changed.clear()
        state = self.hub.streams.get(self.key)
        if state is None:
            return []
        if state.run != self.run:
            self.run, self.told_end = state.run, False
        task_id = self.key[1]
        out: list[dict[str, Any]] = []
        if state.text != self.sent:
            offset = common_prefix(self.sent, state.text)
            out.append(
                {"type": "chunk", "task_id": task_id, "offset": offset, "text": state.text[offset:]}
            )
            self.sent = state.text
        if state.end is not None and not self.told_end:
            out.append({"type": "stream_end", "task_id": task_id, "reason": state.end})
            self.told_end = True
        return out

    def close(self) -> None:
        self.hub.unsubscribe(self)
