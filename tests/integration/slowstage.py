"""A pipelined moderation stage whose batch handler takes `SLOW_STAGE_BATCH_S` per batch (in
`time.sleep`, releasing the GIL as a GPU kernel does), run as its own process by the tests:
`python -m tests.integration.slowstage`, configured by the usual `CONVEYOR_*` variables."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from conveyor.events.model import Event
from conveyor.runtime import Emit, StageContext, StageService
from conveyor.runtime.entry import main
from conveyor.settings import StageSettings
from tests.eventdata import INFERRED, MODERATED
from tests.integration.test_ladder import moderated

BATCH_S = float(os.environ.get("SLOW_STAGE_BATCH_S", "0.1"))


def handle_batch(events: Sequence[Event], _ctx: StageContext[StageSettings]) -> list[Emit]:
    time.sleep(BATCH_S)
    return [Emit(MODERATED, moderated(e)) for e in events]


SERVICE = StageService("moderation", StageSettings, handle_batch=handle_batch, accepts=(INFERRED,))

if __name__ == "__main__":
    main(SERVICE)
