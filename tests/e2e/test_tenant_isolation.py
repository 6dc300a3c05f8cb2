"""One tenant's input never fails another tenant's task, through every service as a process.

Issue 9, section 1: 32 generate tasks from eight tenants and one poisoned task reach inference
together (published in one burst on its input topic, the poison in the middle, as an older edge
could have let it through), so they share a batch and a model group. A second poison arrives as
a Kafka producer would send it: an out-of-range seed straight on the ingress topic, past the
gateway and `conveyor submit`. Each poison must end `failed` alone, with a reason naming the
parameter, and the 32 must complete.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from conveyor.events.avro import default_schemas
from conveyor.events.catalog import INGRESS_TOPIC, load_catalog
from conveyor.events.codec import encode_binary
from conveyor.events.model import AVRO, Event
from conveyor.local.stack import LocalStack
from conveyor.store import open_store
from tests.e2e.conftest import WEBHOOK_ENV
from tests.support import produce_structured, task_doc

pytestmark = [pytest.mark.broker, pytest.mark.models]
PREPROCESSED = "conveyor.task.preprocessed.v1"
TENANTS = [f"tenant{i}" for i in range(8)]
POISON_SEED = "1e30"  # torch.manual_seed overflows on it


def _preprocessed(
    task_id: str, tenant: str, seed: str
) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """A preprocessed generate task as preprocess emits it, for inference's own topic."""
    spec = load_catalog().spec(PREPROCESSED)
    assert spec is not None
    now = datetime.now(UTC).isoformat()
    data: dict[str, Any] = {
        "task": {
            "task_id": task_id,
            "tenant": tenant,
            "kind": "generate",
            "priority": "normal",
            "callback_url": None,
            "deadline": None,
            "submitted_at": now,
            "model": None,
            "params": {"max_new_tokens": "4", "do_sample": "true", "seed": seed},
        },
        "input": "Name a colour.",
        "prompt": "Name a colour.",
        "token_count": 3,
        "labels": [],
    }
    event = Event(
        id=str(uuid.uuid4()),
        type=PREPROCESSED,
        source="/tests/older-edge",
        subject=task_id,
        time=now,
        datacontenttype=AVRO,
        dataschema=spec.dataschema,
        data=data,
        extensions={"tenant": tenant, "priority": "normal"},
    )
    headers, value = encode_binary(event, default_schemas())
    return task_id.encode(), value, headers


def test_poisoned_tasks_fail_alone_while_other_tenants_tasks_complete(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    store_url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_STORE_URL": store_url,
        **WEBHOOK_ENV,
        "CONVEYOR_RETRY_DELAYS": "[1, 1, 1]",
        "OTEL_SDK_DISABLED": "true",
        # One inference batch can hold the 32 and the poison: they share the model group.
        "CONVEYOR_BATCH_MAX": "64",
        "CONVEYOR_BATCH_WAIT_MS": "500",
    }
    run = topic_prefix.strip(".")
    good = [(TENANTS[i % len(TENANTS)], f"{run}-ok-{i:02d}") for i in range(32)]
    at_ingress = f"{run}-poison-ingress"
    at_inference = f"{run}-poison-inference"
    stack = LocalStack(tmp_path, env)
    stack.apply_topics()
    stack.start()
    try:
        burst = [_preprocessed(task_id, tenant, "7") for tenant, task_id in good]
        burst.insert(16, _preprocessed(at_inference, "mallory", POISON_SEED))
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 50})
        for key, value, headers in burst:  # one partition keeps them together in one fetch
            producer.produce(
                topic_prefix + "conveyor.task.preprocessed.normal",
                value,
                key,
                partition=0,
                headers=headers,
            )
        producer.flush(30)
        poison_doc = task_doc(
            at_ingress,
            kind="generate",
            text="Name a colour.",
            tenant="mallory",
            params={"max_new_tokens": 4, "do_sample": True, "seed": 1e30},
        )
        produce_structured(kafka_bootstrap, topic_prefix + INGRESS_TOPIC, [poison_doc])
        store = open_store(store_url)
        ids = [*good, ("mallory", at_ingress), ("mallory", at_inference)]
        deadline = time.monotonic() + 420
        records: dict[str, Any] = {}
        while time.monotonic() < deadline:
            records = {task_id: store.get(task_id, tenant=tenant) for tenant, task_id in ids}
            if all(r is not None and r.terminal for r in records.values()):
                break
            assert not stack.supervise(), "a service died:\n" + "\n".join(
                p.tail() for p in stack.procs.values()
            )
            time.sleep(0.5)
        store.close()
    finally:
        stack.stop()
    logs = "\n".join(f"--- {p.label}\n{p.tail(15)}" for p in stack.procs.values())
    statuses = {t: (r.status if r else None) for t, r in records.items()}
    for _, task_id in good:
        record = records[task_id]
        assert record is not None and record.status == "completed", (statuses, logs)
        assert record.result and record.result.get("text") is not None, record
    for task_id in (at_ingress, at_inference):
        record = records[task_id]
        assert record is not None and record.status == "failed", (statuses, logs)
        assert "seed" in (record.error or ""), record.error
