"""Submitting tasks from Python: what `conveyor submit`, the gateway and the demo use.

A task goes to `conveyor.task.submitted` as a binary-mode CloudEvent with Avro data
(task-submitted, newest version), key = task id, under a `submit <topic>` PRODUCER span: the
root of the task's trace. The client installs tracing from the standard `OTEL_*` variables as
the services do, so that span is exported (`flush()` exports it) and the configured sampler
decides whether the task is traced. Validation here is the same pydantic model preprocess
applies, so callers get a clear error before anything is sent; with `rules` (the pipeline's
templates and models, e.g. `CatalogSettings().task_rules()`) an unknown template or model is
refused here too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

from opentelemetry.trace import SpanKind

from conveyor.errors import BrokerError, PermanentError
from conveyor.events.avro import default_schemas
from conveyor.events.catalog import INGRESS_TOPIC, INGRESS_TYPE, load_catalog
from conveyor.events.codec import encode_binary
from conveyor.events.ingress import TaskRules, parse_task
from conveyor.events.model import AVRO, Event
from conveyor.kafka.config import common
from conveyor.kafka.producer import KafkaProducer
from conveyor.settings import KafkaSettings, StageSettings
from conveyor.telemetry import tracing
from conveyor.telemetry.traceparent import trace_id_of

SUBMITTED = INGRESS_TYPE


class TaskClient:
    def __init__(
        self,
        settings: KafkaSettings,
        *,
        source: str = "/conveyor/client",
        max_record_bytes: int | None = None,
        producer: KafkaProducer | None = None,
        rules: TaskRules | None = None,
        tracing_service: str = "submit",
    ) -> None:
        self.settings = settings
        self.rules = rules
        self.source = source
        # The stages dead-letter larger records; refuse them here, before anything is sent.
        self.max_record_bytes = max_record_bytes or getattr(
            settings, "max_record_bytes", StageSettings.model_fields["max_record_bytes"].default
        )
        self.topic = settings.topic(INGRESS_TOPIC)
        spec = load_catalog().spec(SUBMITTED)
        assert spec is not None
        self.dataschema = spec.dataschema
        self.schemas = default_schemas()
        # Tracing as the services have it, from the same OTEL_* variables (a no-op when they
        # configure no exporter, or when the process already installed it).
        tracing.init_tracing(tracing_service)
        self._server = tracing.server_attributes(settings.kafka_bootstrap)
        # 30 s: how long a full local queue is waited out, and a flush waits for acks.
        self.producer = producer or KafkaProducer.open(
            {**common(settings), "linger.ms": 5, "enable.idempotence": True},
            delivery_timeout_s=30.0,
        )

    def submit(
        self,
        task: Mapping[str, Any],
        *,
        on_delivery: Callable[[Any, Any], None] | None = None,
        queue_wait_s: float | None = None,
    ) -> tuple[str, str | None]:
        """Validate and send one task; returns (task id, trace id). Call `flush()` after.

        `on_delivery(err, msg)`, when given, gets this record's delivery report instead of the
        client's tracking, so an asynchronous caller can await each record's acknowledgement.
        A full local queue is waited out for `queue_wait_s` (default: the delivery timeout),
        then `BrokerError`.
        """
        data = normalise_request(task, self.rules)
        event_id = str(uuid.uuid4())
        # The task's root span; under a ratio sampler most are dropped, and their (unsampled)
        # context tells every stage downstream to drop the task's spans too.
        span = tracing.start_span(
            f"submit {self.topic}",
            parent=None,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": self.topic,
                "messaging.message.id": event_id,
                "messaging.kafka.message.key": data["task_id"],
                **self._server,
                "conveyor.task_id": data["task_id"],
            },
        )
        ext = {"tenant": data["tenant"], "priority": data["priority"]}
        # Every task gets a trace id, even with the SDK off (then one is minted here, sampled
        # or not as the configured sampler would decide).
        parent = tracing.traceparent_of(span) or tracing.new_traceparent()
        ext["traceparent"] = parent
        if data["deadline"]:
            ext["deadline"] = data["deadline"]
        event = Event(
            id=event_id,
            type=SUBMITTED,
            source=self.source,
            subject=data["task_id"],
            data=data,
            datacontenttype=AVRO,
            dataschema=self.dataschema,
            time=datetime.now(UTC).isoformat(timespec="milliseconds"),
            extensions=ext,
        )
        headers, value = encode_binary(event, self.schemas)
        if span.is_recording():
            headers += tracing.inject(span)
        else:
            headers.append(("traceparent", parent.encode()))
        self._check_size(data["task_id"], value, headers, span)
        self.producer.send(
            self.topic,
            value,
            data["task_id"].encode(),
            cast(Any, headers),  # stubs want str | bytes | None values
            on_delivery=on_delivery,
            queue_wait_s=queue_wait_s,
        )
        self.producer.poll(0)
        tracing.end_span(span)
        return data["task_id"], trace_id_of(parent)

    def _check_size(
        self, task_id: str, value: bytes, headers: list[tuple[str, bytes]], span: Any
    ) -> None:
        size = len(task_id.encode()) + len(value) + sum(len(k) + len(v) for k, v in headers)
        if size > self.max_record_bytes:
            error = PermanentError(
                f"task {task_id} encodes to {size} bytes, over the "
                f"{self.max_record_bytes}-byte record limit"
            )
            tracing.end_span(span, error)
            raise error

    def submit_many(self, tasks: Iterable[Mapping[str, Any]]) -> list[str]:
        ids = [self.submit(task)[0] for task in tasks]
        self.flush()
        return ids

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every submitted task's acknowledgement; `BrokerError` if one failed."""
        try:
            self.producer.wait(timeout_s=timeout_s)
        except BrokerError as exc:
            raise BrokerError(f"submit failed: {exc}") from exc
        finally:
            tracing.flush_tracing(timeout_s)  # the submit spans, as the tasks are sent


def normalise_request(task: Mapping[str, Any], rules: TaskRules | None = None) -> dict[str, Any]:
    """Check a task with the ingress model and shape it as task-submitted Avro data."""
    body = dict(task)
    body.setdefault("task_id", str(uuid.uuid4()))
    return parse_task(body, rules).avro()
