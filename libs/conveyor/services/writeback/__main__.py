"""Entry point: `python -m conveyor.services.writeback` (or `conveyor run writeback`)."""

from __future__ import annotations

from conveyor.retention import start_sweeper
from conveyor.runtime.entry import main
from conveyor.runtime.typed import TypedService, payload_by_type
from conveyor.services.writeback.handler import WritebackResources, handle_batch
from conveyor.services.writeback.settings import WritebackSettings
from conveyor.store import open_store


def setup(settings: WritebackSettings) -> WritebackResources:
    # The retention sweep runs beside the stage on its own connection (None: sweep_s is 0).
    return WritebackResources(store=open_store(settings.store_url), sweeper=start_sweeper(settings))


def teardown(resources: WritebackResources) -> None:
    if resources.sweeper is not None:
        resources.sweeper.stop()
    resources.store.close()


WRITEBACK = TypedService(
    "writeback",
    WritebackSettings,
    payload=payload_by_type,
    setup=setup,
    handle_batch=handle_batch,
    teardown=teardown,
)
SERVICE = WRITEBACK.service()

if __name__ == "__main__":
    main(SERVICE)
