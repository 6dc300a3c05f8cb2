"""Which records of a generation group stream, and the sinks their partial text goes to.

A record streams when its task asked (`params.stream`) and the process streams at all
(`CONVEYOR_STREAM_ENABLED`, the `streams` resource). Each call opens a new run per record: a
group re-run record by record, or a retried task, starts its stream again from the beginning,
and readers replace the older run's text. Sinks are closed whatever happened to the call, so
a run that failed ends its stream `interrupted` instead of leaving readers waiting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from conveyor.events.params import parse_params
from conveyor.events.payloads import TaskPreprocessed
from conveyor.streaming.publisher import ChunkPublisher, TaskStream


def open_sinks(
    streams: ChunkPublisher | None, batch: Sequence[TaskPreprocessed]
) -> dict[int, TaskStream]:
    """Position in `batch` -> a new stream, for each record that streams."""
    if streams is None:
        return {}
    return {
        i: streams.open(data.task.task_id, data.task.tenant, data.input)
        for i, data in enumerate(batch)
        if wants_stream(data.task.params)
    }


def wants_stream(raw: Mapping[str, str]) -> bool:
    """Whether the task asked to stream (its params were already checked: a bad one is no)."""
    try:
        return bool(parse_params("generate", raw).stream)
    except ValueError:
        return False


def close_sinks(sinks: Mapping[int, TaskStream]) -> None:
    for sink in sinks.values():
        sink.close()
