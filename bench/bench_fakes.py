"""Stand-ins for confluent-kafka's Message, Consumer and Producer: the in-process overhead bench
drives `StageRunner.process` with them, so what it times is the runtime, not the network."""

from __future__ import annotations

from typing import Any


class FakeMessage:
    __slots__ = ("_topic", "_partition", "_offset", "_key", "_value", "_headers")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, bytes]],
    ) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._key, self._value, self._headers = key, value, headers

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)


class FakeProducer:
    """Counts records; `poll` and `flush` acknowledge everything produced."""

    def __init__(self) -> None:
        self.produced = 0
        self.reports: list[Any] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, **kw: Any) -> None:
        self.produced += 1
        callback = kw.get("on_delivery")
        if callback is not None:
            self.reports.append(callback)

    def flush(self, _timeout: float = 0) -> int:
        self.poll()
        return 0

    def poll(self, _timeout: float = 0) -> int:
        reports, self.reports = self.reports, []
        for callback in reports:
            callback(None, None)
        return len(reports)


class FakeConsumer:
    def commit(self, **_: Any) -> None:
        return None

    def assignment(self) -> list[Any]:
        return []
