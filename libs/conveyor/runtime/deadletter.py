"""Dead letters: the original record, untouched, plus headers that say why it failed.

Error headers (all `conveyor_` prefixed, UTF-8): `conveyor_error_stage`, `conveyor_error_class`,
`conveyor_error_message`, `conveyor_error_traceback` (truncated), `conveyor_error_attempts`,
`conveyor_error_time`, and the record's first place in the pipeline: `conveyor_original_topic`,
`conveyor_original_partition`, `conveyor_original_offset` (kept as is when the record climbed the
retry ladder, so it still names the stage input it came from).
"""

from __future__ import annotations

import traceback as tb
from dataclasses import dataclass

# Set by the operator tools on the records they send back (`<topic>:<partition>:<offset>`).
REDRIVEN_FROM = "conveyor_redriven_from"
REPLAYED_FROM = "conveyor_replayed_from"
ORIGINAL_TOPIC = "conveyor_original_topic"
ORIGINAL_PARTITION = "conveyor_original_partition"
ORIGINAL_OFFSET = "conveyor_original_offset"
ERROR_PREFIX = "conveyor_error_"
TRACEBACK_MAX = 4000
MESSAGE_MAX = 1000


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a record failed: the error class name, its message, a short reason label."""

    error_class: str
    message: str
    reason: str
    traceback: str
    permanent: bool

    @classmethod
    def of(cls, exc: BaseException, *, permanent: bool) -> Failure:
        text = "".join(tb.format_exception(exc))
        return cls(
            error_class=type(exc).__name__,
            message=str(exc)[:MESSAGE_MAX] or type(exc).__name__,
            reason=reason_of(exc),
            traceback=text[-TRACEBACK_MAX:],
            permanent=permanent,
        )


def reason_of(exc: BaseException) -> str:
    """A low-cardinality label for metrics: the error class, snake-cased."""
    name = type(exc).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def origin_headers(
    headers: list[tuple[str, bytes]], topic: str, partition: int, offset: int
) -> list[tuple[str, bytes]]:
    """Add the record's first place in the pipeline unless an earlier hop already did."""
    if any(k == ORIGINAL_TOPIC for k, _ in headers):
        return headers
    return headers + [
        (ORIGINAL_TOPIC, topic.encode()),
        (ORIGINAL_PARTITION, str(partition).encode()),
        (ORIGINAL_OFFSET, str(offset).encode()),
    ]


def dead_letter_headers(
    headers: list[tuple[str, bytes]], failure: Failure, *, stage: str, attempts: int, now: str
) -> list[tuple[str, bytes]]:
    kept = [(k, v) for k, v in headers if not k.startswith(ERROR_PREFIX)]
    return kept + [
        (ERROR_PREFIX + "stage", stage.encode()),
        (ERROR_PREFIX + "class", failure.error_class.encode()),
        (ERROR_PREFIX + "reason", failure.reason.encode()),
        (ERROR_PREFIX + "message", failure.message.encode()),
        (ERROR_PREFIX + "traceback", failure.traceback.encode()),
        (ERROR_PREFIX + "attempts", str(attempts).encode()),
        (ERROR_PREFIX + "time", now.encode()),
    ]
