"""What every `conveyor` command shares: finding the Kafka cluster and the result store.

The cluster is `CONVEYOR_KAFKA_BOOTSTRAP` when set, else the local broker that
`conveyor broker start` or `conveyor up` started (its state file under `var/`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from conveyor.paths import var_dir
from conveyor.settings import KafkaSettings

UP_STATE = "up.json"


def up_state_path() -> Path:
    return var_dir() / UP_STATE


def local_bootstrap() -> str | None:
    """The bootstrap of a running `conveyor up` or `conveyor broker start`, if any."""
    try:
        state = json.loads(up_state_path().read_text())
        return str(state["bootstrap"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        from conveyor.broker.state import status_detached

        status = status_detached()
        return status.bootstrap if status.running else None
    except Exception:
        return None


def kafka_settings() -> KafkaSettings:
    if os.environ.get("CONVEYOR_KAFKA_BOOTSTRAP"):
        return KafkaSettings()
    bootstrap = local_bootstrap()
    if bootstrap:
        return KafkaSettings(kafka_bootstrap=bootstrap)
    return KafkaSettings()


def store_url() -> str:
    if os.environ.get("CONVEYOR_STORE_URL"):
        return os.environ["CONVEYOR_STORE_URL"]
    try:
        return str(json.loads(up_state_path().read_text())["store_url"])
    except (OSError, ValueError, KeyError):
        from conveyor.settings import StoreSettings

        return StoreSettings().store_url.get_secret_value()
