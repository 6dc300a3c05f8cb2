"""Entry point: `python -m conveyor.services.writeback` (or `conveyor run writeback`)."""

from __future__ import annotations

from typing import Any

from conveyor.retention import start_sweeper
from conveyor.runtime.entry import main
from conveyor.runtime.handler import StageService
from conveyor.services.writeback.handler import handle_batch
from conveyor.services.writeback.settings import WritebackSettings
from conveyor.store import open_store


def setup(settings: WritebackSettings) -> dict[str, Any]:
    # The retention sweep runs beside the stage on its own connection (None: sweep_s is 0).
    return {"store": open_store(settings.store_url), "sweeper": start_sweeper(settings)}


def teardown(resources: dict[str, Any]) -> None:
    if resources.get("sweeper") is not None:
        resources["sweeper"].stop()
    resources["store"].close()


SERVICE = StageService(
    "writeback", WritebackSettings, handle_batch=handle_batch, setup=setup, teardown=teardown
)

if __name__ == "__main__":
    main(SERVICE)
