"""The gateway's generic building blocks: token table, bearer header parsing, expiring map, cached
consumer-lag total."""

from __future__ import annotations

import threading

import pytest

from conveyor.errors import BrokerError
from conveyor.kafka.lag import CachedLag
from conveyor.web.auth import TokenTable, bearer_token
from conveyor.web.expiring import ExpiringMap


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_table_maps_each_token_to_its_tenant_and_nothing_else() -> None:
    table = TokenTable({"tok-a": "acme", "tok-b": "beta", "": "nobody"})
    assert (table.tenant_for("tok-a"), table.tenant_for("tok-b")) == ("acme", "beta")
    for wrong in (None, "", "tok-", "tok-a ", "TOK-A"):
        assert table.tenant_for(wrong) is None
    assert len(table) == 2  # an empty token never authenticates


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer ", None),
        ("Bearerabc", None),
        (None, None),
    ],
)
def test_bearer_token_reads_only_the_bearer_scheme(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_expiring_map_forgets_entries_after_their_ttl() -> None:
    clock = Clock()
    seen: ExpiringMap[str, int] = ExpiringMap(ttl_s=10, max_size=100, clock=clock)
    seen.put("a", 1)
    clock.now = 9.9
    assert seen.get("a") == 1
    seen.put("b", 2)
    clock.now = 10.0
    assert (seen.get("a"), seen.get("b")) == (None, 2)
    seen.put("c", 3)  # purges the expired head
    assert len(seen) == 2


def test_expiring_map_drops_the_oldest_beyond_its_size() -> None:
    seen: ExpiringMap[str, int] = ExpiringMap(ttl_s=60, max_size=2, clock=Clock())
    for i, key in enumerate("abc"):
        seen.put(key, i)
    assert [seen.get(k) for k in "abc"] == [None, 1, 2]


def test_cached_lag_probes_once_per_interval() -> None:
    clock, calls = Clock(), list[int]()

    def probe() -> int:
        calls.append(1)
        return len(calls) * 10

    lag = CachedLag(probe, ttl_s=5, clock=clock)
    assert [lag.value(), lag.value()] == [10, 10]
    clock.now = 5.0
    assert lag.value() == 20
    assert len(calls) == 2


def test_cached_lag_is_none_while_the_broker_fails_and_does_not_hammer_it() -> None:
    clock, calls = Clock(), list[int]()

    def probe() -> int:
        calls.append(1)
        raise BrokerError("no broker")

    lag = CachedLag(probe, ttl_s=5, clock=clock)
    assert [lag.value(), lag.value()] == [None, None]
    assert len(calls) == 1


def test_cached_lag_serves_the_previous_value_while_another_caller_refreshes() -> None:
    clock = Clock()
    entered, release = threading.Event(), threading.Event()
    values = iter([3, 4])

    def probe() -> int:
        value = next(values)
        if value == 4:
            entered.set()
            assert release.wait(10)
        return value

    lag = CachedLag(probe, ttl_s=5, clock=clock)
    assert lag.value() == 3
    clock.now = 6.0
    slow = threading.Thread(target=lag.value)
    slow.start()
    assert entered.wait(10)
    assert lag.value() == 3  # not blocked behind the slow probe
    release.set()
    slow.join(10)
    assert lag.value() == 4
