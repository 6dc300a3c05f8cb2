"""Entry point: `python -m services.notify` (or `conveyor run notify`)."""

from __future__ import annotations

from typing import Any

from conveyor.runtime.entry import main
from conveyor.runtime.handler import StageService
from services.notify.handler import handle, resources
from services.notify.settings import NotifySettings


def teardown(res: dict[str, Any]) -> None:
    res["http"].close()
    res["store"].close()


SERVICE = StageService("notify", NotifySettings, handle=handle, setup=resources, teardown=teardown)

if __name__ == "__main__":
    main(SERVICE)
