"""Where one real hop spends its CPU: its Python threads, or librdkafka's own threads.

One broker (a `LocalBroker` of its own); for each of the raw loop of bench/hops.py (consume →
produce → flush → commit) and Conveyor's moderation relay stage (bench/hops.py, tracing off, as
the peer benchmark runs it), on topics of its own, in a process of its own: a warm-up, then
`--records` task-inferred records written in one burst and read back from the hop's output.
The hop process's CPU time is read per thread from /proc (Linux) before and after, and split
into librdkafka's threads (`rdk:*`: fetch, serialize, send) and the Python threads (the loop:
the Python step, the consume and produce calls, delivery callbacks, commits). µs per record.

    python bench/hop_threads.py --records 10000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from hops import run_raw_hop, run_relay  # noqa: E402
from overhead import batch_of_inferred  # noqa: E402

from conveyor.broker.local import LocalBroker

_TICK = os.sysconf("SC_CLK_TCK")
WARMUP = 500
PARTITIONS = 6
SOURCE = "conveyor.task.inferred"
TARGET = "conveyor.task.moderated"


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of process `pid` per kind of thread: librdkafka's (`rdk:*`) or the rest."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        seconds = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
        key = "librdkafka threads" if name.startswith("rdk:") else "Python threads"
        out[key] = out.get(key, 0.0) + seconds
    return out


def produce(bootstrap: str, topic: str, n: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for msg in batch_of_inferred(n):
        producer.produce(topic, msg.value(), msg.key(), headers=msg.headers())
        producer.poll(0)
    producer.flush(60)


class Sink:
    """Counts the records arriving on the hop's output topic."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"sink-{topic}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.consumer.subscribe([topic])
        self.count = 0

    def wait(self, total: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.count} of {total} records arrived in {timeout_s}s")
            self.count += sum(1 for m in self.consumer.consume(1000, 0.5) if m.error() is None)


def one(bootstrap: str, name: str, n: int) -> dict[str, Any]:
    """One hop of kind `name` (conveyor, raw) on topics of its own: µs of CPU per record per
    kind of thread, over `n` records after a warm-up."""
    prefix = f"{name}."
    source, target = prefix + SOURCE, prefix + TARGET
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics(
        [NewTopic(t, PARTITIONS, 1) for t in (source, target)]
    ).values():
        future.result(60)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    if name == "conveyor":
        env = {"OTEL_SDK_DISABLED": "true"}
        proc = ctx.Process(target=run_relay, args=("moderation", bootstrap, prefix, env, stop))
    else:
        proc = ctx.Process(target=run_raw_hop, args=(bootstrap, source, target, "raw", stop))
    proc.start()
    assert proc.pid is not None
    sink = Sink(bootstrap, target)
    try:
        produce(bootstrap, source, WARMUP)
        sink.wait(WARMUP, 300)
        before = thread_cpu(proc.pid)
        started = time.monotonic()
        produce(bootstrap, source, n)
        sink.wait(WARMUP + n, 300)
        elapsed = time.monotonic() - started
        after = thread_cpu(proc.pid)
    finally:
        stop.set()
        proc.join(30)
        sink.consumer.close()
    us = {k: round((after[k] - before.get(k, 0.0)) / n * 1e6, 1) for k in after}
    return {"us_per_record": us, "total_us": round(sum(us.values()), 1), "wall_s": elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--records", type=int, default=20_000)
    args = p.parse_args()
    load = os.getloadavg()
    with_broker = LocalBroker().start()
    try:
        figures = {
            name: one(with_broker.bootstrap, name, args.records) for name in ("raw", "conveyor")
        }
    finally:
        with_broker.stop()
    report = {
        "records": args.records,
        "load_average_at_start": [round(x, 2) for x in load],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        **figures,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
