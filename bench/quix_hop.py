"""One Quix Streams hop for `bench/peers.py`: topic in → topic out, Quix's defaults otherwise.

Runs in the bench virtualenv (`.venv-bench`), never in Conveyor's: Quix Streams pins an older
confluent-kafka than Conveyor does, so this file imports nothing from Conveyor. The hop is what a
Quix user writes for a no-op stage: an `Application` (default at-least-once guarantee, default
commit interval), a `StreamingDataFrame` over the input topic with Quix's default JSON
deserializer, and `to_topic` with its default JSON serializer (key and headers pass through).
`auto_offset_reset="earliest"` only so that the warm-up's records are read whatever the order of
group join and first produce. It stops on SIGTERM (Quix's own handler: finish, flush, commit).
Given an Avro schema file, it reads and writes with Quix's Avro (de)serializers instead (fastavro,
schemaless, as Conveyor's events are): the same decode and encode work a Conveyor hop does.

    .venv-bench/bin/python bench/quix_hop.py BOOTSTRAP SOURCE_TOPIC TARGET_TOPIC GROUP [SCHEMA]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from quixstreams import Application
from quixstreams.models.serializers.avro import AvroDeserializer, AvroSerializer


def main(bootstrap: str, source: str, target: str, group: str, schema: str = "") -> None:
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        loglevel="WARNING",  # as the Conveyor hops: no per-record or per-commit lines
    )
    reads: dict[str, Any] = {}
    writes: dict[str, Any] = {}
    if schema:
        parsed = json.loads(Path(schema).read_text())
        reads["value_deserializer"] = AvroDeserializer(parsed)
        writes["value_serializer"] = AvroSerializer(parsed)
    frame = app.dataframe(app.topic(source, **reads))
    frame.to_topic(app.topic(target, **writes))
    app.run()


if __name__ == "__main__":
    main(*sys.argv[1:6])
