"""Entry point: `python -m conveyor.services.notify` (or `conveyor run notify`)."""

from __future__ import annotations

from conveyor.events.payloads import TaskStored
from conveyor.runtime.entry import main
from conveyor.runtime.typed import TypedService, payload_of
from conveyor.services.notify.handler import NotifyResources, handle_batch, resources
from conveyor.services.notify.settings import NotifySettings


def teardown(res: NotifyResources) -> None:
    res.webhooks.close()
    res.store.close()


NOTIFY = TypedService(
    "notify",
    NotifySettings,
    payload=payload_of(TaskStored),
    setup=resources,
    handle_batch=handle_batch,
    teardown=teardown,
)
SERVICE = NOTIFY.service()

if __name__ == "__main__":
    main(SERVICE)
