"""The retry ladder: which rung a failed record climbs to, and when a rung's record is due.

Retry state travels in the event (`attempt`, `firstfailedat`, `lasterror` extension headers),
never in memory, so it survives restarts and rebalances. A record on `conveyor.<stage>.retry.<n>`
is due `delays[n-1]` seconds after it was written there (its Kafka timestamp).
Attempt counting: the first failure makes attempt 1 and goes to rung 1; a record that fails on
the last rung has attempt = rungs + 1 and goes to the dead-letter topic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from conveyor.events.model import ATTEMPT, FIRSTFAILEDAT, LASTERROR

_RUNG = re.compile(r"\.retry\.(\d+)$")
# `lasterror` rides in every retried record's headers: keep it short.
LASTERROR_MAX = 200


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    delays_s: tuple[float, ...]

    @property
    def rungs(self) -> int:
        return len(self.delays_s)

    def next_rung(self, attempt: int) -> int | None:
        """The rung for a record whose `attempt`-th try just failed, or None: dead-letter it."""
        return attempt if 1 <= attempt <= self.rungs else None

    def due_ms(self, rung: int, written_ms: int) -> int:
        return written_ms + int(self.delays_s[rung - 1] * 1000)


def rung_of(topic: str) -> int:
    """The rung number of a retry topic, 0 for any other topic."""
    match = _RUNG.search(topic)
    return int(match.group(1)) if match else 0


def retry_headers(
    headers: list[tuple[str, bytes]], *, attempt: int, first_failed_at: str, error: str
) -> list[tuple[str, bytes]]:
    """The record's headers with its retry state replaced; everything else untouched."""
    state = {"ce_" + ATTEMPT, "ce_" + FIRSTFAILEDAT, "ce_" + LASTERROR}
    out = [(k, v) for k, v in headers if k not in state]
    out.append(("ce_" + ATTEMPT, str(attempt).encode()))
    out.append(("ce_" + FIRSTFAILEDAT, first_failed_at.encode()))
    out.append(("ce_" + LASTERROR, _one_line(error)[:LASTERROR_MAX].encode()))
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())
