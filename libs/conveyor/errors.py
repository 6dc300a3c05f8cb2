"""The error taxonomy handlers use to tell the runtime what to do with a failed record.

`RetryableError` sends the record up the stage's retry ladder; `PermanentError` sends it straight
to the stage's dead-letter topic. Any other exception raised by a handler counts as retryable:
an unexpected failure is more often a transient fault than a property of the input.
"""

from __future__ import annotations


class ConveyorError(Exception):
    """Base class of every error Conveyor raises on purpose."""


class RetryableError(ConveyorError):
    """A transient failure (timeout, unavailable database, CUDA OOM): try again later."""


class PermanentError(ConveyorError):
    """Invalid input that no retry can fix: dead-letter it at once."""


class BrokerError(ConveyorError):
    """Kafka itself failed (delivery or commit). Never dead-lettered: the process must restart."""
