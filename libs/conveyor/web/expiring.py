"""A bounded map whose entries expire: memory of recent requests for an HTTP front end.

The gateway remembers the tasks it accepted until the result store knows them. Entries are kept
in insertion order, so both expiry and the size bound drop the oldest first; expired entries are
purged as new ones arrive, which keeps every operation O(1) amortised without a timer.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ExpiringMap(Generic[K, V]):
    """At most `max_size` entries, each readable for `ttl_s` after it was put. Not thread-safe:
    meant for one asyncio event loop."""

    def __init__(
        self, *, ttl_s: float, max_size: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._max_size = max_size
        self._clock = clock
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: K, value: V) -> None:
        now = self._clock()
        self._items.pop(key, None)
        self._items[key] = (now + self._ttl_s, value)
        while self._items:
            first_expiry, _ = next(iter(self._items.values()))
            if first_expiry > now and len(self._items) <= self._max_size:
                break
            self._items.popitem(last=False)

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None or item[0] <= self._clock():
            return None
        return item[1]
