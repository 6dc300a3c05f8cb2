"""`conveyor dlq` and `conveyor replay` against the real broker and a real preprocess stage.

The stage runs in-process as a `StageRunner` thread: the real preprocess handler behind a switch
that makes some tasks fail (a missing dependency: permanent; an upstream timeout: retryable,
through the ladder) until the test "fixes" it. Dead letters therefore come from the runtime
itself, with a mix of causes, including undecodable bytes and input preprocess rejects.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import Message
from confluent_kafka.admin import AdminClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor.cli.main import main
from conveyor.client import normalise_request
from conveyor.dlq.records import DeadLetterFilter
from conveyor.dlq.redrive import redrive
from conveyor.errors import PermanentError, RetryableError
from conveyor.events.avro import default_schemas
from conveyor.events.catalog import load_catalog
from conveyor.events.codec import encode_binary
from conveyor.events.model import Event
from conveyor.runtime import Emit
from conveyor.runtime.stage import StageRunner
from conveyor.runtime.typed import Context, Record, TypedService, raw_data
from conveyor.services.preprocess.handler import PreprocessResources, word_count
from conveyor.services.preprocess.handler import handle as preprocess
from conveyor.services.preprocess.settings import PreprocessSettings
from conveyor.settings import KafkaSettings
from tests.support import apply, headers_of, produce_raw, read_topics

pytestmark = pytest.mark.broker
INGRESS = "conveyor.task.submitted"
DLQ = "conveyor.preprocess.dlq"
LANES = [
    "conveyor.task.preprocessed.high",
    "conveyor.task.preprocessed.normal",
    "conveyor.task.preprocessed.low",
]
SUBMITTED = "conveyor.task.submitted.v1"


class DependencyMissingError(PermanentError):
    pass


class UpstreamTimeoutError(RetryableError):
    pass


@dataclass
class Stage:
    """preprocess as a thread; until `fixed` is set, some inputs fail on purpose."""

    bootstrap: str
    prefix: str
    fixed: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    runner: StageRunner | None = None
    thread: threading.Thread | None = None

    def handle(
        self, record: Record[Any], ctx: Context[PreprocessSettings, PreprocessResources]
    ) -> Emit:
        text = str((record.event.data or {}).get("input", ""))
        if not self.fixed.is_set():
            if "needs-dependency" in text:
                raise DependencyMissingError("the template dictionary is not loaded")
            if "flaky" in text:
                raise UpstreamTimeoutError("the tokenizer service timed out")
        return preprocess(record, ctx)

    def start(self) -> None:
        service = TypedService(
            "preprocess",
            PreprocessSettings,
            payload=raw_data,
            handle=self.handle,
            setup=lambda _s: PreprocessResources(count_tokens=word_count),
        ).service()
        settings = PreprocessSettings(
            stage="preprocess",
            kafka_bootstrap=self.bootstrap,
            topic_prefix=self.prefix,
            tokenizers=False,
            retry_delays=[0.2],
            poll_timeout_ms=50,
        )
        self.runner = StageRunner(service, settings)
        self.thread = threading.Thread(target=self._run, name="preprocess", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        assert self.runner is not None
        try:
            self.runner.run()
        except BaseException as exc:  # surfaced by stop()
            self.errors.append(exc)

    def stop(self) -> None:
        if self.runner is None or self.thread is None:
            return
        self.runner.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "stage did not stop within 30 s"
        self.runner = self.thread = None
        assert not self.errors, self.errors


def traceparent() -> str:
    return f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"


def submit(bootstrap: str, prefix: str, tasks: dict[str, str]) -> dict[str, str]:
    """Binary-mode task-submitted events (as TaskClient sends them, with a trace context);
    returns task id -> traceparent."""
    spec = load_catalog().spec(SUBMITTED)
    assert spec is not None
    records, parents = [], {}
    for task_id, text in tasks.items():
        parent = parents[task_id] = traceparent()
        data = normalise_request(
            {"task_id": task_id, "tenant": "acme", "kind": "embed", "input": text}
        )
        event = Event(
            id=str(uuid.uuid4()),
            type=SUBMITTED,
            source="/tests",
            subject=task_id,
            data=data,
            dataschema=spec.dataschema,
            time=datetime.now(UTC).isoformat(timespec="milliseconds"),
            extensions={"tenant": "acme", "priority": "normal", "traceparent": parent},
        )
        headers, value = encode_binary(event, default_schemas())
        records.append((task_id.encode(), value, headers + [("traceparent", parent.encode())]))
    produce_raw(bootstrap, prefix + INGRESS, records)
    return parents


def after_now() -> int:
    """A millisecond timestamp later than every record produced so far; returns once the
    clock has passed it, so records produced next have larger timestamps."""
    mark = int(time.time() * 1000) + 1
    deadline = time.monotonic() + 1.0
    while time.time() * 1000 <= mark:
        assert time.monotonic() < deadline, "clock did not advance"
    return mark


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def keys(msgs: list[Message]) -> collections.Counter[str]:
    return collections.Counter((m.key() or b"").decode() for m in msgs)


@dataclass
class Population:
    bootstrap: str
    prefix: str
    stage: Stage
    split: int  # ms: phase-1 dead letters before, phase-2 ones at or after
    parents: dict[str, str]


@pytest.fixture(scope="module")
def dead(kafka_bootstrap: str) -> Iterator[Population]:
    """Seven dead letters of preprocess, in two phases separated by `split`."""
    prefix = f"t{uuid.uuid4().hex[:8]}."
    apply(kafka_bootstrap, prefix)
    stage = Stage(kafka_bootstrap, prefix)
    stage.start()
    try:
        parents = submit(
            kafka_bootstrap,
            prefix,
            {
                "dep-1": "needs-dependency one",
                "dep-2": "needs-dependency two",
                "flaky-1": "flaky tokenizer",
                "empty-1": "   ",
                "ok-1": "fine",
                "ok-2": "fine too",
            },
        )
        produce_raw(kafka_bootstrap, prefix + INGRESS, [(b"junk-1", b"not a cloudevent", [])])
        assert len(read_topics(kafka_bootstrap, [prefix + DLQ], expect=5, timeout_s=60)) == 5
        split = after_now()
        parents |= submit(
            kafka_bootstrap, prefix, {"dep-3": "needs-dependency three", "empty-2": ""}
        )
        assert len(read_topics(kafka_bootstrap, [prefix + DLQ], expect=7, timeout_s=60)) == 7
        yield Population(kafka_bootstrap, prefix, stage, split, parents)
    finally:
        stage.stop()


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    def run(bootstrap: str, prefix: str, *argv: str) -> tuple[int, str, str]:
        monkeypatch.setenv("CONVEYOR_KAFKA_BOOTSTRAP", bootstrap)
        monkeypatch.setenv("CONVEYOR_TOPIC_PREFIX", prefix)
        capsys.readouterr()
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def listed(cli: Any, pop: Population, *filters: str) -> list[str]:
    import json

    code, out, err = cli(pop.bootstrap, pop.prefix, "dlq", "list", "--json", *filters)
    assert code == 0, err
    return sorted(json.loads(row)["task_id"] for row in out.splitlines())


def test_list_filters_return_exactly_the_matching_dead_letters(dead: Population, cli: Any) -> None:
    everything = ["dep-1", "dep-2", "dep-3", "empty-1", "empty-2", "flaky-1", "junk-1"]
    assert listed(cli, dead, "--stage", "preprocess") == everything
    assert listed(cli, dead) == everything  # every stage: the others have none
    assert listed(cli, dead, "--stage", "notify") == []
    assert listed(cli, dead, "--error-class", "DependencyMissingError") == [
        "dep-1",
        "dep-2",
        "dep-3",
    ]
    assert listed(cli, dead, "--error-class", "UpstreamTimeoutError") == ["flaky-1"]
    assert listed(cli, dead, "--error-class", "DecodeError") == ["junk-1"]
    assert listed(cli, dead, "--task-id", "dep-2") == ["dep-2"]
    assert listed(cli, dead, "--until", rfc3339(dead.split)) == [
        "dep-1",
        "dep-2",
        "empty-1",
        "flaky-1",
        "junk-1",
    ]
    assert listed(cli, dead, "--since", rfc3339(dead.split)) == ["dep-3", "empty-2"]
    assert listed(
        cli, dead, "--since", rfc3339(dead.split), "--error-class", "DependencyMissingError"
    ) == ["dep-3"]
    assert listed(cli, dead, "--since", "1h") == everything
    trace_id = dead.parents["dep-1"].split("-")[1]
    assert listed(cli, dead, "--trace-id", trace_id) == ["dep-1"]


def test_list_line_names_error_origin_and_dlq_offset(dead: Population, cli: Any) -> None:
    code, out, _ = cli(dead.bootstrap, dead.prefix, "dlq", "list", "--task-id", "flaky-1")
    assert code == 0
    (row,) = out.splitlines()
    assert "preprocess" in row and "UpstreamTimeoutError" in row and "timed out" in row
    assert f"original={dead.prefix}{INGRESS}:" in row and " dlq=" in row


def test_show_prints_every_header_and_the_decoded_event(dead: Population, cli: Any) -> None:
    code, out, _ = cli(dead.bootstrap, dead.prefix, "dlq", "show", "--task-id", "flaky-1")
    assert code == 0
    assert "conveyor_error_class: UpstreamTimeoutError" in out
    assert "conveyor_error_attempts: 2" in out and "ce_attempt: 1" in out  # via the ladder
    assert "conveyor_error_traceback:" in out and "Traceback" in out
    assert f"type: {SUBMITTED}" in out and '"input": "flaky tokenizer"' in out
    ref = out.splitlines()[0].split()[2]
    code, again, _ = cli(dead.bootstrap, dead.prefix, "dlq", "show", ref)
    assert code == 0 and again == out
    code, junk, _ = cli(dead.bootstrap, dead.prefix, "dlq", "show", "--task-id", "junk-1")
    assert code == 0 and "not a CloudEvent" in junk and "not a cloudevent" in junk


def test_dry_run_redrive_lists_and_produces_nothing(dead: Population, cli: Any) -> None:
    before = _high(dead, INGRESS)
    code, out, err = cli(
        dead.bootstrap,
        dead.prefix,
        "dlq",
        "redrive",
        "--dry-run",
        "--error-class",
        "DependencyMissingError",
    )
    assert code == 0, err
    assert out.count("would redrive") == 3 and "would_redrive=3" in out
    assert _high(dead, INGRESS) == before
    # `topics apply` made the ledger; a dry run writes nothing to it.
    assert _high(dead, "conveyor.dlq.redrives") == 0


def test_redrive_after_the_fix_completes_tasks_once_in_a_new_linked_trace(
    dead: Population, cli: Any
) -> None:
    dead.stage.fixed.set()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = KafkaSettings(kafka_bootstrap=dead.bootstrap, topic_prefix=dead.prefix)
    flt = DeadLetterFilter.build(
        stage="preprocess", error_classes=["DependencyMissingError", "UpstreamTimeoutError"]
    )
    report = redrive(settings, flt, tracer=provider.get_tracer("test"))
    fixed = ["dep-1", "dep-2", "dep-3", "flaky-1"]
    assert len(report.redriven) == 4 and report.already_redriven == 0

    out = read_topics(
        dead.bootstrap, [dead.prefix + t for t in LANES], expect=6, timeout_s=60, settle_s=1.0
    )
    assert keys(out) == collections.Counter(["ok-1", "ok-2", *fixed])  # each exactly once
    redriven = [
        m
        for m in read_topics(dead.bootstrap, [dead.prefix + INGRESS], expect=13, timeout_s=30)
        if "conveyor_redriven_from" in headers_of(m)
    ]
    assert sorted(keys(redriven)) == fixed
    links = {format(s.links[0].context.trace_id, "032x") for s in exporter.get_finished_spans()}
    assert links == {dead.parents[t].split("-")[1] for t in fixed}
    outputs = {(m.key() or b"").decode(): headers_of(m) for m in out}
    for msg in redriven:
        h, task_id = headers_of(msg), msg.key().decode()
        assert h["ce_subject"] == task_id
        assert not [k for k in h if k.startswith(("conveyor_error_", "conveyor_original_"))]
        assert not {"ce_attempt", "ce_firstfailedat", "ce_lasterror"} & set(h)
        new_trace = h["traceparent"].split("-")[1]
        assert new_trace != dead.parents[task_id].split("-")[1]
        assert h["ce_traceparent"] == h["traceparent"]
        assert h["conveyor_linked_traceparent"] == dead.parents[task_id]
        assert h["conveyor_redriven_from"].startswith(dead.prefix + DLQ + ":")
        assert outputs[task_id]["traceparent"].split("-")[1] == new_trace  # stage followed it

    code, text, err = cli(
        dead.bootstrap,
        dead.prefix,
        "dlq",
        "redrive",
        "--stage",
        "preprocess",
        "--error-class",
        "DependencyMissingError",
        "--error-class",
        "UpstreamTimeoutError",
    )
    assert code == 0, err
    assert "redriven=0 already_redriven=4" in text
    code, listing, _ = cli(dead.bootstrap, dead.prefix, "dlq", "list", "--task-id", "dep-1")
    assert listing.rstrip().endswith("redriven")
    again = read_topics(
        dead.bootstrap, [dead.prefix + t for t in LANES], expect=6, timeout_s=30, settle_s=1.0
    )
    assert keys(again) == keys(out)  # the second redrive sent nothing


def _high(pop: Population, topic: str) -> int:
    from conveyor.dlq.reader import open_reader, watermarks

    settings = KafkaSettings(kafka_bootstrap=pop.bootstrap, topic_prefix=pop.prefix)
    with open_reader(settings) as consumer:
        return sum(high for _, high in watermarks(consumer, [pop.prefix + topic]).values())


def test_redrive_rate_limit_spaces_records(kafka_bootstrap: str, topic_prefix: str) -> None:
    apply(kafka_bootstrap, topic_prefix)
    origin = [
        ("conveyor_original_topic", (topic_prefix + INGRESS).encode()),
        ("conveyor_error_class", b"RetryableError"),
    ]
    produce_raw(
        kafka_bootstrap, topic_prefix + DLQ, [(f"r-{i}".encode(), b"{}", origin) for i in range(6)]
    )
    settings = KafkaSettings(kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix)
    started = time.monotonic()
    report = redrive(settings, DeadLetterFilter(), rate=5.0)
    elapsed = time.monotonic() - started
    assert len(report.redriven) == 6
    assert elapsed >= (6 - 1) / 5.0
    sent = read_topics(kafka_bootstrap, [topic_prefix + INGRESS], expect=6, timeout_s=30)
    stamps = sorted(m.timestamp()[1] for m in sent)
    assert len(stamps) == 6 and stamps[-1] - stamps[0] >= 1000 - 5  # ms clock granularity


def _three_batches(bootstrap: str, prefix: str) -> tuple[list[list[str]], list[int]]:
    """Batches a, b, c submitted at distinct times; returns them and the two boundaries."""
    batches = [[f"{name}-{i}" for i in range(3)] for name in "abc"]
    marks = []
    for n, batch in enumerate(batches):
        if n:
            marks.append(after_now())
        submit(bootstrap, prefix, {t: f"text of {t}" for t in batch})
    return batches, marks


def test_republish_of_a_time_range_reprocesses_exactly_that_range(
    kafka_bootstrap: str, topic_prefix: str, cli: Any
) -> None:
    apply(kafka_bootstrap, topic_prefix)
    stage = Stage(kafka_bootstrap, topic_prefix)
    stage.start()
    try:
        (a, b, c), (t1, t2) = _three_batches(kafka_bootstrap, topic_prefix)
        lanes = [topic_prefix + t for t in LANES]
        assert len(read_topics(kafka_bootstrap, lanes, expect=9, timeout_s=60)) == 9
        code, out, err = cli(
            kafka_bootstrap,
            topic_prefix,
            "replay",
            "--stage",
            "preprocess",
            "--mode",
            "republish",
            "--from",
            rfc3339(t1),
            "--to",
            rfc3339(t2),
        )
        assert code == 0, err
        assert "republished 3 records" in out
        after = read_topics(kafka_bootstrap, lanes, expect=12, timeout_s=60, settle_s=1.0)
    finally:
        stage.stop()
    assert keys(after) == collections.Counter(a + b + b + c)


def test_reset_reconsumes_from_a_time_and_is_refused_while_the_group_is_active(
    kafka_bootstrap: str, topic_prefix: str, cli: Any
) -> None:
    apply(kafka_bootstrap, topic_prefix)
    stage = Stage(kafka_bootstrap, topic_prefix)
    stage.start()
    lanes = [topic_prefix + t for t in LANES]
    try:
        (a, b, c), (t1, _) = _three_batches(kafka_bootstrap, topic_prefix)
        first = read_topics(kafka_bootstrap, lanes, expect=9, timeout_s=120)
        assert len(first) == 9, _whereabouts(kafka_bootstrap, topic_prefix, a + b + c, first)
        code, _, err = cli(
            kafka_bootstrap, topic_prefix, "replay", "--stage", "preprocess", "--from", rfc3339(t1)
        )
        assert code == 2 and "is active" in err
    finally:
        stage.stop()
    _wait_inactive(kafka_bootstrap, f"{topic_prefix}conveyor.preprocess")
    code, out, err = cli(
        kafka_bootstrap,
        topic_prefix,
        "replay",
        "--stage",
        "preprocess",
        "--from",
        rfc3339(t1),
        "--dry-run",
    )
    assert code == 0 and "would reset" in out, err
    code, out, err = cli(
        kafka_bootstrap, topic_prefix, "replay", "--stage", "preprocess", "--from", rfc3339(t1)
    )
    assert code == 0, err
    stage.start()
    try:
        after = read_topics(kafka_bootstrap, lanes, expect=15, timeout_s=60, settle_s=1.0)
    finally:
        stage.stop()
    assert keys(after) == collections.Counter(a + b + b + c + c)


def _whereabouts(bootstrap: str, prefix: str, sent: list[str], got: list[Message]) -> str:
    """Where each task id missing from `got` is, over every topic of this test: a failure
    then says whether a record was lost, held in a retry topic, or dead-lettered."""
    missing = set(sent) - set(keys(got))
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    found: dict[str, list[str]] = collections.defaultdict(list)
    for msg in read_topics(bootstrap, topics, expect=10**6, timeout_s=10):
        key = (msg.key() or b"").decode("utf-8", "replace")
        if key in missing:
            found[key].append(str(msg.topic()))
    return f"missing {sorted(missing)}; found in: {dict(found)}"


def _wait_inactive(bootstrap: str, group: str, timeout_s: float = 30.0) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout_s
    while True:
        description = admin.describe_consumer_groups([group])[group].result(timeout=10)
        if not description.members:
            return
        assert time.monotonic() < deadline, f"group {group} still has members"
        time.sleep(0.1)
