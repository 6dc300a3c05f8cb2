"""A real single-node Apache Kafka broker (KRaft, no Docker) for the demo and the tests.

`LocalBroker` runs one broker in the foreground of a test session or script; `start_detached`,
`status_detached` and `stop_detached` back `conveyor broker start|status|stop`. The Kafka jars come
from Maven Central through `pom.xml` beside this package, cached under `.cache/kafka` (`jars.py`).
"""

from __future__ import annotations

from conveyor.broker.config import BrokerConfig, render_server_properties, server_settings
from conveyor.broker.jars import BrokerSetupError, conveyor_home, ensure_jars
from conveyor.broker.local import BrokerStartError, LocalBroker
from conveyor.broker.state import (
    DetachedStatus,
    StopResult,
    default_state_dir,
    start_detached,
    status_detached,
    stop_detached,
)

__all__ = [
    "BrokerConfig",
    "BrokerSetupError",
    "BrokerStartError",
    "DetachedStatus",
    "LocalBroker",
    "StopResult",
    "conveyor_home",
    "default_state_dir",
    "ensure_jars",
    "render_server_properties",
    "server_settings",
    "start_detached",
    "status_detached",
    "stop_detached",
]
