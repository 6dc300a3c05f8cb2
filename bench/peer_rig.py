"""The processes of `bench/peers.py`: every contender's five hops, the model stage, source, sink.

Each contender is a five-hop chain, topic i → i+1, every hop its own process: raw confluent-kafka
hops and Conveyor relay stages (`bench/hops.py`) run from Conveyor's virtualenv; Quix Streams hops
(`bench/quix_hop.py`) from the bench virtualenv, which has Quix's own confluent-kafka. All of them
start at once and stay up for the whole run, so every round meets warm, joined consumers; a
contender whose round is not running only polls. One source and one sink process serve every
contender (`bench/peer_io.py`). Topics are fresh for each run (a random run tag in their names).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from hops import FINAL_TOPIC, STAGES, run_raw_hop, run_relay
from peer_io import run_sink, run_source
from peer_model import INPUT_TOPIC, OUTPUT_TOPIC, run_model_stage

from conveyor.events.catalog import INGRESS_TOPIC
from conveyor.settings import KafkaSettings
from conveyor.topology import apply_topics

HERE = Path(__file__).resolve().parent
CONTENDERS = ("raw", "quix", "conveyor_off", "conveyor_sampled", "conveyor_on")
# On request only: Quix Streams with its Avro (de)serializers on the very records Conveyor gets.
OPTIONAL = ("quix_avro",)
QUIX = ("quix", "quix_avro")
SCHEMA = HERE.parent / "schemas" / "task-submitted.v2.avsc"  # what the source's Avro is written in
SHORT = {
    "raw": "raw",
    "quix": "quix",
    "quix_avro": "qavro",
    "conveyor_off": "off",
    "conveyor_sampled": "smp",
    "conveyor_on": "on",
}
STOP_WAIT_S = 30.0  # a hop finishes its batch, flushes and leaves its group well within this


@dataclass
class Chain:
    """A five-hop pipeline: where the source writes, where the sink reads, whose CPU counts."""

    name: str
    source: str
    sink: str
    form: str  # the source's record form (peer_io.SourceJob.form)
    topics: list[str] = field(default_factory=list)  # raw and Quix hops: hop i reads topics[i]
    pids: list[int] = field(default_factory=list)
    counters: tuple[Any, Any] | None = None  # the model stage's handler calls and records

    @property
    def short(self) -> str:
        return SHORT.get(self.name, self.name)


@dataclass
class Rig:
    chains: dict[str, Chain]
    model: Chain | None
    source: Connection
    sink: Connection
    pids: list[int]  # every process the rig started


@dataclass
class Options:
    bootstrap: str
    contenders: tuple[str, ...]
    partitions: int
    bench_python: str
    otlp: dict[str, str]  # contender -> OTLP endpoint of its receiver
    model_batch_max: int = 0  # 0 = no model stage


@contextmanager
def running(opts: Options) -> Iterator[Rig]:
    """Start everything, yield the rig, stop everything (hops get SIGTERM / their stop event)."""
    run = uuid.uuid4().hex[:6]
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs: list[Any] = []
    quix: list[subprocess.Popen[bytes]] = []
    chains = {name: _chain(name, run, opts) for name in opts.contenders}
    model = _model_chain(run, opts) if opts.model_batch_max else None
    source, source_end = ctx.Pipe()
    sink, sink_end = ctx.Pipe()
    sinks = [c.sink for c in chains.values()] + ([model.sink] if model else [])
    try:
        for chain in chains.values():
            if chain.name in QUIX:
                hops = _start_quix(chain, run, opts)
                quix += hops
                chain.pids = [p.pid for p in hops]
            else:
                chain.pids = _start_hops(ctx, chain, run, opts, stop, procs)
        if model is not None:
            prefix = model.source.removesuffix(INPUT_TOPIC)
            model.counters = (ctx.Value("q", 0), ctx.Value("q", 0))
            args = (opts.bootstrap, prefix, opts.model_batch_max, model.counters, stop)
            model.pids = _spawn(ctx, procs, run_model_stage, args)
        _spawn(ctx, procs, run_source, (opts.bootstrap, source_end))
        _spawn(ctx, procs, run_sink, (opts.bootstrap, sinks, opts.partitions, sink_end))
        if not sink.poll(120) or sink.recv() != "ready":
            raise RuntimeError("sink did not start in 120 s")
        pids = [p.pid for p in procs] + [p.pid for p in quix]
        yield Rig(chains, model, source, sink, pids)
    finally:
        stop.set()
        for proc in quix:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.join(STOP_WAIT_S)
            if proc.is_alive():
                proc.terminate()
        for proc in quix:
            try:
                proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()


def _chain(name: str, run: str, opts: Options) -> Chain:
    if name in ("raw", *QUIX):
        topics = [f"b{run}-{SHORT[name]}.hop{i}" for i in range(6)]
        _create_topics(opts.bootstrap, topics, opts.partitions)
        return Chain(name, topics[0], topics[-1], "json" if name == "quix" else "avro", topics)
    prefix = f"b{run}-{SHORT[name]}."
    apply_topics(
        KafkaSettings(kafka_bootstrap=opts.bootstrap, topic_prefix=prefix),
        partitions=opts.partitions,
    )
    return Chain(name, prefix + INGRESS_TOPIC, prefix + FINAL_TOPIC, "avro")


def _model_chain(run: str, opts: Options) -> Chain:
    prefix = f"b{run}-inf."
    apply_topics(
        KafkaSettings(kafka_bootstrap=opts.bootstrap, topic_prefix=prefix),
        partitions=opts.partitions,
    )
    return Chain("model_stage", prefix + INPUT_TOPIC, prefix + OUTPUT_TOPIC, "preprocessed")


def _create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    for future in futures.values():
        future.result(30)


def _start_hops(
    ctx: Any, chain: Chain, run: str, opts: Options, stop: Any, procs: list[Any]
) -> list[int]:
    pids: list[int] = []
    if chain.name == "raw":
        topics = chain.topics
        for i in range(5):
            args = (opts.bootstrap, topics[i], topics[i + 1], f"b{run}-raw-{i}", stop)
            pids += _spawn(ctx, procs, run_raw_hop, args)
        return pids
    prefix = chain.source.removesuffix(INGRESS_TOPIC)
    env = _tracing_env(chain.name, opts.otlp.get(chain.name, ""))
    for stage in STAGES:
        pids += _spawn(ctx, procs, run_relay, (stage, opts.bootstrap, prefix, env, stop))
    return pids


def _start_quix(chain: Chain, run: str, opts: Options) -> list[subprocess.Popen[bytes]]:
    topics = chain.topics
    script = str(HERE / "quix_hop.py")
    schema = str(SCHEMA) if chain.name == "quix_avro" else ""
    return [
        subprocess.Popen(
            [
                opts.bench_python,
                script,
                opts.bootstrap,
                topics[i],
                topics[i + 1],
                f"b{run}-{chain.short}-{i}",
                schema,
            ],
            stdin=subprocess.DEVNULL,
            # Quix's optional dependencies warn about deprecations at import: noise here.
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        for i in range(5)
    ]


def _spawn(ctx: Any, procs: list[Any], target: Any, args: tuple[Any, ...]) -> list[int]:
    proc = ctx.Process(target=target, args=args, daemon=True)
    proc.start()
    procs.append(proc)
    return [proc.pid]


def _tracing_env(name: str, endpoint: str) -> dict[str, str]:
    if name == "conveyor_off":
        return {"OTEL_SDK_DISABLED": "true"}
    traced = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "always_on",
        "OTEL_SDK_DISABLED": "false",
    }
    if name == "conveyor_sampled":
        # What a production deployment runs: trace 10% of tasks (decided at the first hop),
        # every later hop follows its parent's choice.
        traced["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        traced["OTEL_TRACES_SAMPLER_ARG"] = "0.1"
    return traced
