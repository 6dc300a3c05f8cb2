"""Entry point: `python -m conveyor.services.notify` (or `conveyor run notify`)."""

from __future__ import annotations

from typing import Any

from conveyor.runtime.entry import main
from conveyor.runtime.handler import StageService
from conveyor.services.notify.handler import handle_batch, resources
from conveyor.services.notify.settings import NotifySettings


def teardown(res: dict[str, Any]) -> None:
    res["webhooks"].close()
    res["store"].close()


SERVICE = StageService(
    "notify", NotifySettings, handle_batch=handle_batch, setup=resources, teardown=teardown
)

if __name__ == "__main__":
    main(SERVICE)
