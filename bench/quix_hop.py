"""One Quix Streams hop for `bench/peers.py`: topic in → topic out, Quix's defaults otherwise.

Runs in the bench virtualenv (`.venv-bench`), never in Conveyor's: Quix Streams pins an older
confluent-kafka than Conveyor does, so this file imports nothing from Conveyor. The hop is what a
Quix user writes for a no-op stage: an `Application` (default at-least-once guarantee, default
commit interval), a `StreamingDataFrame` over the input topic with Quix's default JSON
deserializer, and `to_topic` with its default JSON serializer (key and headers pass through).
`auto_offset_reset="earliest"` only so that the warm-up's records are read whatever the order of
group join and first produce. It stops on SIGTERM (Quix's own handler: finish, flush, commit).

    .venv-bench/bin/python bench/quix_hop.py BOOTSTRAP SOURCE_TOPIC TARGET_TOPIC GROUP
"""

from __future__ import annotations

import sys

from quixstreams import Application


def main(bootstrap: str, source: str, target: str, group: str) -> None:
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        loglevel="WARNING",  # as the Conveyor hops: no per-record or per-commit lines
    )
    frame = app.dataframe(app.topic(source))
    frame.to_topic(app.topic(target))
    app.run()


if __name__ == "__main__":
    main(*sys.argv[1:5])
