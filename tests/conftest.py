"""Session-wide Kafka fixtures: one real broker per test session, a topic prefix per test.

`kafka_bootstrap` is `CONVEYOR_KAFKA_BOOTSTRAP` when set (an existing cluster), otherwise a
`LocalBroker` (single-node KRaft, local Java) started once for the session. A broker that cannot
start is an ERROR of every test that needs it, never a skip: CI must not go green without Kafka.
Tests that use the broker get the `broker` marker, so `-m "not broker"` runs the rest.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from conveyor.broker.local import LocalBroker

EXTERNAL_BOOTSTRAP_ENV = "CONVEYOR_KAFKA_BOOTSTRAP"


@pytest.fixture(scope="session")
def _local_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker | None]:
    """The session's LocalBroker, or None when an external cluster is configured."""
    if os.environ.get(EXTERNAL_BOOTSTRAP_ENV):
        yield None
        return
    # pytest keeps the last few basetemp dirs, so the broker log survives a failed run.
    broker = LocalBroker(tmp_path_factory.mktemp("kafka"))
    try:
        broker.start()  # raises with the broker log tail: the requesting tests error out
    except Exception:
        broker.stop()
        raise
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(_local_broker: LocalBroker | None) -> str:
    """bootstrap.servers of the session's Kafka cluster."""
    if _local_broker is None:
        return os.environ[EXTERNAL_BOOTSTRAP_ENV]
    return _local_broker.bootstrap


@pytest.fixture
def kafka_broker(_local_broker: LocalBroker | None) -> Iterator[LocalBroker]:
    """The LocalBroker itself, for tests that stop, kill or restart it.

    Skipped only when the session uses an external cluster (we cannot restart that one). If a test
    leaves the broker down, it is started again so later tests still have a broker.
    """
    if _local_broker is None:
        pytest.skip(f"{EXTERNAL_BOOTSTRAP_ENV} points at an external cluster")
    yield _local_broker
    if not _local_broker.is_running():
        _local_broker.restart()


@pytest.fixture
def topic_prefix() -> str:
    """A prefix unique to this test (`t<8 hex>.`) for its topics and consumer groups."""
    return f"t{uuid.uuid4().hex[:8]}."


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"kafka_bootstrap", "kafka_broker"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)
