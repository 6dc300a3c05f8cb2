"""Cancellation: a tenant withdraws a task it submitted (docs/cancellation.md).

`Canceller` records the cancel in the result store (the authority: whichever terminal status a
task reaches first stays) and publishes it twice: a `cancelled` status event, which writeback
and notify turn into the timeline entry and the one webhook, and a record on the compacted
cancel topic, which every stage replica reads into a `CancelWatch` to skip the task's records.
"""

from __future__ import annotations

from conveyor.cancel.request import CancelAnswer, Canceller
from conveyor.cancel.topic import CANCEL_CONFIG, CANCEL_TOPIC, cancel_key
from conveyor.cancel.watch import CancelWatch

__all__ = [
    "CANCEL_CONFIG",
    "CANCEL_TOPIC",
    "CancelAnswer",
    "CancelWatch",
    "Canceller",
    "cancel_key",
]
