"""Ingress as careless upstreams and foreign clients publish it, through the real services.

One pipeline (preprocess, inference, moderation, writeback as processes, embed model only) serves
the module:
- malformed records keyed with the ids of completed tasks never rewrite those tasks: each gets a
  timeline note, while malformed records with fresh ids become `failed` tasks, and every one is
  in the dead-letter topic (issue 13);
- kcat, a non-Python Kafka client, publishes tasks in structured and binary mode, without key,
  without subject, as plain JSON without any CloudEvents header, and two keyless tasks back to
  back: each ends with the right status in exactly one row (docs/ingress.md);
- a failed task is rerun only by an operator: a resubmission after the fix leaves it `failed`,
  `conveyor dlq redrive` completes it, and its timeline names the redrive (last: it restarts
  preprocess with the fix).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pytest
from confluent_kafka import Consumer, Message

from conveyor.client import TaskClient
from conveyor.dlq.records import DeadLetterFilter
from conveyor.dlq.redrive import redrive
from conveyor.events.codec import PLAIN_JSON_SOURCE
from conveyor.events.model import assigned_task_id
from conveyor.local.samples import MINILM_ONLY
from conveyor.local.stack import LocalStack
from conveyor.services.preprocess.settings import DEFAULT_TEMPLATES
from conveyor.settings import KafkaSettings
from conveyor.store import REJECTED_RECORD, ResultStore, TaskRecord, is_terminal, open_store
from tests.support import produce_raw, read_topics

pytestmark = [pytest.mark.broker, pytest.mark.models]
INGRESS = "conveyor.task.submitted"
FINISHED = 100  # completed tasks that malformed records then name
WAIT_S = 240.0  # generous: two shared cores, every service a process


@dataclass(frozen=True)
class Pipeline:
    bootstrap: str
    prefix: str
    store_url: str
    stack: LocalStack

    @property
    def ingress(self) -> str:
        return self.prefix + INGRESS

    def store(self) -> ResultStore:
        return open_store(self.store_url)

    def rows(self, like: str) -> int:
        """Rows of `tasks` whose id matches the SQL LIKE pattern."""
        path = self.store_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as conn:
            return int(
                conn.execute("SELECT COUNT(*) FROM tasks WHERE task_id LIKE ?", (like,)).fetchone()[
                    0
                ]
            )


@pytest.fixture(scope="module")
def pipeline(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    workdir = tmp_path_factory.mktemp("ingress")
    prefix = f"t{uuid.uuid4().hex[:8]}."
    store_url = f"sqlite:///{workdir / 'ingress.db'}"
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": prefix,
        "CONVEYOR_STORE_URL": store_url,
        "CONVEYOR_MODELS": MINILM_ONLY,
        "CONVEYOR_LOG_LEVEL": "WARNING",
        "OTEL_SDK_DISABLED": "true",
    }
    # notify is not needed: what these tests prove ends in the store.
    stack = LocalStack(
        workdir, env, services=("preprocess", "inference", "moderation", "writeback")
    )
    stack.apply_topics()
    stack.start()
    try:
        yield Pipeline(kafka_bootstrap, prefix, store_url, stack)
    finally:
        stack.stop()


def wait_for(
    pipeline: Pipeline,
    ids: Iterable[str],
    done: Callable[[TaskRecord | None], bool],
    *,
    what: str,
) -> dict[str, TaskRecord | None]:
    """Poll the store until `done(record)` holds for every id (bounded), then return them."""
    ids = list(ids)
    store = pipeline.store()
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            records = {i: store.get(i) for i in ids}
            if all(done(r) for r in records.values()):
                return records
            if time.monotonic() > deadline:
                missing = [i for i, r in records.items() if not done(r)]
                logs = "\n".join(p.tail(10) for p in pipeline.stack.procs.values())
                pytest.fail(f"{what}: {len(missing)} not done, e.g. {missing[:3]}\n{logs}")
            assert not pipeline.stack.supervise(), "a service died"
            time.sleep(0.5)
    finally:
        store.close()


def terminal(record: TaskRecord | None) -> bool:
    return record is not None and is_terminal(record.status)


# -- a finished task stays finished ------------------------------------------------------------


def malformed(key: str, n: int) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """Two careless-upstream shapes: a structured CloudEvent cut short, and bare garbage."""
    if n % 2:
        return (
            key.encode(),
            b'{"specversion": "1.0", "id": "x", "data": {',
            [("content-type", b"application/cloudevents+json")],
        )
    return key.encode(), b"\x00\xffnot a task at all", []


def test_malformed_records_never_rewrite_finished_tasks(pipeline: Pipeline) -> None:
    run = uuid.uuid4().hex[:6]
    done_ids = [f"done-{run}-{i:03d}" for i in range(FINISHED)]
    fresh_ids = [f"fresh-{run}-{i:03d}" for i in range(FINISHED)]
    client = TaskClient(
        KafkaSettings(kafka_bootstrap=pipeline.bootstrap, topic_prefix=pipeline.prefix)
    )
    client.submit_many(
        {"task_id": t, "tenant": "acme", "kind": "embed", "input": f"finished task {i}"}
        for i, t in enumerate(done_ids)
    )
    before = wait_for(pipeline, done_ids, terminal, what="valid tasks")
    assert all(r is not None and r.status == "completed" for r in before.values())

    records = [malformed(t, i) for i, t in enumerate(done_ids + fresh_ids)]
    produce_raw(pipeline.bootstrap, pipeline.ingress, records)
    failed = wait_for(pipeline, fresh_ids, terminal, what="fresh ids")
    store = pipeline.store()
    try:
        deadline = time.monotonic() + WAIT_S
        while True:  # the notes arrive with the fresh failures; bounded all the same
            notes = {
                t: [e for e in store.timeline(t) if e.status == REJECTED_RECORD] for t in done_ids
            }
            if all(notes.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        after = {t: store.get(t) for t in done_ids}
    finally:
        store.close()

    for task_id, record in after.items():
        old = before[task_id]
        assert record is not None and old is not None
        assert (record.status, record.result, record.error) == ("completed", old.result, None)
        assert record.result is not None and len(record.result["embedding"]) == 384
        assert record.updated_at == old.updated_at and record.completed_at == old.completed_at
        assert len(notes[task_id]) == 1, (task_id, notes[task_id])
        assert "DecodeError" in (notes[task_id][0].detail or "")
    for task_id, record in failed.items():
        assert record is not None and record.status == "failed", (task_id, record)
        assert (record.error or "").startswith("DecodeError:"), record.error
    dlq = read_topics(
        pipeline.bootstrap,
        [pipeline.prefix + "conveyor.preprocess.dlq"],
        expect=2 * FINISHED,
        timeout_s=60,
        settle_s=1.0,
    )
    sent = {key: value for key, value, _ in records}
    mine = Counter((m.key() or b"") for m in dlq if (m.key() or b"") in sent)
    assert mine == Counter(sent.keys()), "every malformed record is dead-lettered exactly once"
    assert all(m.value() == sent[m.key()] for m in dlq if m.key() in sent)  # type: ignore[index]


# -- foreign clients: kcat -----------------------------------------------------------------------


def kcat(
    pipeline: Pipeline,
    lines: list[str],
    *,
    key: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """Publish one record per line with kcat, as a non-Python upstream does."""
    binary = shutil.which("kcat")
    if binary is None:
        pytest.fail("kcat is missing: run deploy/tools/install-tools.sh (Debian package kcat)")
    cmd = [binary, "-P", "-b", pipeline.bootstrap, "-t", pipeline.ingress]
    if key is not None:
        cmd += ["-k", key]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}={value}"]
    proc = subprocess.run(  # noqa: S603 - a fixed tool and arguments the test builds
        cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def task_data(task_id: str | None, text: str, **extra: object) -> dict[str, object]:
    data: dict[str, object] = {"tenant": "acme", "kind": "embed", "input": text, **extra}
    if task_id is not None:
        data["task_id"] = task_id
    return data


def structured(task_id: str, *, subject: bool) -> str:
    doc: dict[str, object] = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "/upstream/kcat",
        "type": "conveyor.task.submitted.v1",
        "datacontenttype": "application/json",
        "data": task_data(task_id, f"structured {task_id}"),
    }
    if subject:
        doc["subject"] = task_id
    return json.dumps(doc)


def binary_headers(task_id: str, *, subject: bool) -> dict[str, str]:
    headers = {
        "ce_specversion": "1.0",
        "ce_id": str(uuid.uuid4()),
        "ce_source": "/upstream/kcat",
        "ce_type": "conveyor.task.submitted.v1",
        "content-type": "application/json",
    }
    if subject:
        headers["ce_subject"] = task_id
    return headers


def test_kcat_tasks_in_every_shape_end_once_with_the_right_status(pipeline: Pipeline) -> None:
    run = f"kc-{uuid.uuid4().hex[:6]}"
    expect: dict[str, str] = {}

    def t(name: str, status: str = "completed") -> str:
        expect[f"{run}-{name}"] = status
        return f"{run}-{name}"

    structured_mode = {"content-type": "application/cloudevents+json"}
    kcat(
        pipeline,
        [structured(t("structured"), subject=True)],
        key=f"{run}-structured",
        headers=structured_mode,
    )
    kcat(pipeline, [structured(t("structured-keyless"), subject=True)], headers=structured_mode)
    # Two keyless, subject-less tasks back to back, in one kcat run.
    pair = [structured(t("pair-1"), subject=False), structured(t("pair-2"), subject=False)]
    kcat(pipeline, pair, headers=structured_mode)
    task_id = t("binary")
    kcat(
        pipeline,
        [json.dumps(task_data(task_id, "binary"))],
        key=task_id,
        headers=binary_headers(task_id, subject=True),
    )
    task_id = t("binary-subjectless")
    kcat(
        pipeline,
        [json.dumps(task_data(task_id, "binary, keyed"))],
        key=task_id,
        headers=binary_headers(task_id, subject=False),
    )
    for name in ("binary-bare-1", "binary-bare-2"):  # keyless and subject-less, back to back
        task_id = t(name)
        kcat(
            pipeline,
            [json.dumps(task_data(task_id, name))],
            headers=binary_headers(task_id, subject=False),
        )
    # Plain JSON, no CloudEvents header at all: accepted as a task (docs/ingress.md).
    kcat(pipeline, [json.dumps(task_data(t("plain"), "plain json"))])
    invalid = task_data(t("plain-invalid", "failed"), "no kind")
    del invalid["kind"]
    kcat(pipeline, [json.dumps(invalid)])
    marker = f"no id at all {run}"
    kcat(pipeline, [json.dumps(task_data(None, marker))])

    records = wait_for(pipeline, expect, terminal, what="kcat tasks")
    statuses = {i: (r.status if r else None) for i, r in records.items()}
    assert statuses == expect
    bad = records[f"{run}-plain-invalid"]
    assert bad is not None and "kind" in (bad.error or ""), bad
    assert pipeline.rows(f"{run}-%") == len(expect)  # exactly one row per task, no extras

    # The task without an id got one, derived from where its record is, and says so.
    record = find_record(pipeline, marker.encode())
    at = f"{record.topic()}:{record.partition()}:{record.offset()}"
    assigned = assigned_task_id(f"event {PLAIN_JSON_SOURCE} {at}")
    [auto] = wait_for(pipeline, [assigned], terminal, what="task without id").values()
    assert auto is not None and auto.status == "completed"
    store = pipeline.store()
    try:
        details = [e.detail or "" for e in store.timeline(assigned)]
    finally:
        store.close()
    assert any("task id assigned by preprocess" in d for d in details), details
    assert pipeline.rows(assigned) == 1


def find_record(pipeline: Pipeline, needle: bytes) -> Message:
    """The ingress record whose value contains `needle` (read from the start, bounded)."""
    consumer = Consumer(
        {
            "bootstrap.servers": pipeline.bootstrap,
            "group.id": f"find-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([pipeline.ingress])
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is None and needle in (msg.value() or b""):
                    return msg
    finally:
        consumer.close()
    pytest.fail(f"no ingress record contains {needle!r}")


# -- an operator re-run is the one override ------------------------------------------------------


def test_only_an_operator_redrive_reruns_a_failed_task_and_the_timeline_says_so(
    pipeline: Pipeline,
) -> None:
    task_id = f"rd-{uuid.uuid4().hex[:6]}"
    task = {
        "task_id": task_id,
        "tenant": "acme",
        "kind": "embed",
        "input": "hello",
        "template": "x",
    }
    settings = KafkaSettings(kafka_bootstrap=pipeline.bootstrap, topic_prefix=pipeline.prefix)
    TaskClient(settings).submit_many([task])
    [failed] = wait_for(pipeline, [task_id], terminal, what="task with unknown template").values()
    assert failed is not None and failed.status == "failed" and "template" in (failed.error or "")

    # The fix: preprocess learns the template.
    preprocess = pipeline.stack.procs["preprocess"]
    preprocess.stop()
    preprocess.env["CONVEYOR_TEMPLATES"] = json.dumps({**DEFAULT_TEMPLATES, "x": "{input}"})
    preprocess.start()
    preprocess.wait_ready(120)

    # Resubmitting the id runs the task, but a finished task stays finished.
    TaskClient(settings).submit_many([task])
    store = pipeline.store()
    try:
        deadline = time.monotonic() + WAIT_S
        while not any(e.status == "completed" for e in store.timeline(task_id)):
            assert time.monotonic() < deadline, store.timeline(task_id)
            time.sleep(0.5)
        record = store.get(task_id)
        assert record is not None and record.status == "failed" and record.result is None

        report = redrive(settings, DeadLetterFilter.build(stage="preprocess", task_id=task_id))
        assert len(report.redriven) == 1, report
        [ref] = report.redriven
        while (record := store.get(task_id)) is None or record.status != "completed":
            assert time.monotonic() < deadline, store.timeline(task_id)
            time.sleep(0.5)
        timeline = store.timeline(task_id)
    finally:
        store.close()
    assert record.result is not None and len(record.result["embedding"]) == 384
    operator = [e for e in timeline if (e.detail or "").startswith(f"operator redrive {ref}")]
    assert {e.status for e in operator} == {"processing", "completed"}, timeline
