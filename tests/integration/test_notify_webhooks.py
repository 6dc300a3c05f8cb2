"""The real notify service (its own process, the real broker) against real receivers.

Stored events are produced straight onto notify's input, so no model runs. The receivers listen
on 127.0.0.1, which the destination policy refuses unless allowlisted; every webhook is checked
with Conveyor's verifier and with the independent `standardwebhooks` package.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import psutil
import pytest
import standardwebhooks
from confluent_kafka import Producer

from conveyor.events.avro import default_schemas
from conveyor.events.codec import decode
from conveyor.local.process import ServiceProcess
from conveyor.local.receiver import Delivery, WebhookReceiver
from conveyor.webhooks import new_secret, verify
from tests.eventdata import STORED_TOPIC, TRACEPARENT, stored_record
from tests.httpservers import Server, ok
from tests.support import apply, headers_of, read_topics

SECRETS = {"acme": new_secret(), "globex": new_secret()}
DLQ = "conveyor.notify.dlq"
NOTIFIED = "conveyor.task.notified"
STATUS = "conveyor.task.status"


@pytest.fixture
def env(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> dict[str, str]:
    apply(kafka_bootstrap, topic_prefix)
    return {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_STORE_URL": f"sqlite:///{tmp_path / 'conveyor.db'}",
        "CONVEYOR_WEBHOOK_SECRETS": json.dumps(SECRETS),
        "CONVEYOR_RETRY_DELAYS": "[60]",  # a retried webhook stays on its rung for the test
        "OTEL_SDK_DISABLED": "true",
    }


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hooks = WebhookReceiver(SECRETS).start()
    yield hooks
    hooks.stop()


def start_notify(env: dict[str, str], workdir: Path, **extra: str) -> ServiceProcess:
    proc = ServiceProcess("notify", {**env, **extra}, workdir)
    proc.start()
    proc.wait_ready(120)
    return proc


def produce(env: dict[str, str], *tasks: tuple[str, str, str]) -> None:
    """(task id, tenant, callback URL) as stored events, one flush, on one partition: notify
    takes them in one poll, so they are one batch."""
    producer = Producer({"bootstrap.servers": env["CONVEYOR_KAFKA_BOOTSTRAP"]})
    topic = env["CONVEYOR_TOPIC_PREFIX"] + STORED_TOPIC
    for task_id, tenant, url in tasks:
        key, value, headers = stored_record(task_id, tenant=tenant, callback_url=url)
        producer.produce(topic, value, key, headers=headers, partition=0)
    assert producer.flush(30) == 0


def wait_for(condition: object, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def reasons(env: dict[str, str], topic: str, expect: int) -> dict[str, str]:
    """task id -> error message of the dead letters on notify's DLQ."""
    msgs = read_topics(
        env["CONVEYOR_KAFKA_BOOTSTRAP"], [env["CONVEYOR_TOPIC_PREFIX"] + topic], expect=expect
    )
    return {
        (m.key() or b"").decode(): headers_of(m).get("conveyor_error_message", "") for m in msgs
    }


def statuses(env: dict[str, str], expect: int) -> dict[str, dict[str, object]]:
    msgs = read_topics(
        env["CONVEYOR_KAFKA_BOOTSTRAP"], [env["CONVEYOR_TOPIC_PREFIX"] + STATUS], expect=expect
    )
    events = [decode(list(m.headers() or []), m.value(), default_schemas()) for m in msgs]
    return {e.data["task_id"]: e.data for e in events}


def verified_by_both(delivery: Delivery, tenant: str) -> bool:
    ours = verify(delivery.raw, delivery.headers, SECRETS[tenant])
    theirs = standardwebhooks.Webhook(SECRETS[tenant]).verify(delivery.raw, delivery.headers)
    return bool(ours == theirs == delivery.body)


def test_notify_refuses_a_loopback_receiver_by_default_and_delivers_once_allowlisted(
    env: dict[str, str], receiver: WebhookReceiver, tmp_path: Path
) -> None:
    refusing = start_notify(env, tmp_path / "default")
    try:
        produce(env, ("refused", "acme", receiver.url + "?token=s3cr3t"))
        dead = reasons(env, DLQ, 1)
        assert "127.0.0.1 is loopback" in dead["refused"], dead
        assert "s3cr3t" not in dead["refused"]
        status = statuses(env, 1)["refused"]  # the reason is in the task's timeline
        assert status["status"] == "failed" and "loopback" in str(status["reason"])
    finally:
        refusing.stop()
    assert receiver.snapshot() == []
    allowing = start_notify(env, tmp_path / "allowed", CONVEYOR_WEBHOOK_ALLOW="127.0.0.1/32")
    try:
        produce(env, ("allowed", "globex", receiver.url))
        assert wait_for(lambda: receiver.snapshot()), allowing.tail()
    finally:
        allowing.stop()
    (delivery,) = receiver.snapshot()
    assert delivery.task_id == "allowed" and delivery.signature_ok
    assert verified_by_both(delivery, "globex")
    # SDK off: the webhook still carries the task's trace context.
    assert delivery.headers["traceparent"] == TRACEPARENT


def test_notify_sends_a_batch_side_by_side_bounded_in_time_and_answer_size(
    env: dict[str, str], receiver: WebhookReceiver, tmp_path: Path
) -> None:
    stop = threading.Event()
    healthy_while_trickling: list[bool] = []

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"z" * 600:  # a byte a second, ~10 min
            if stop.wait(1.0):
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()

    def huge(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(256 * 1024 * 1024))
        handler.end_headers()
        chunk = b"x" * 65536
        for _ in range(4096):  # 256 MiB unless notify hangs up first
            handler.wfile.write(chunk)

    admin = Server(ok)
    slow, big = Server(trickle), Server(huge)

    def redirect(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", f"http://127.0.0.1:{admin.port}/admin")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    moved = Server(redirect)
    notify = start_notify(
        env,
        tmp_path,
        CONVEYOR_WEBHOOK_ALLOW="127.0.0.1/32",
        CONVEYOR_WEBHOOK_TIMEOUT_S="8",
        CONVEYOR_BATCH_WAIT_MS="1000",
    )
    try:
        assert notify.proc is not None
        rss_before = psutil.Process(notify.proc.pid).memory_info().rss
        produce(
            env,
            ("slow", "acme", slow.url),
            ("fast", "globex", receiver.url),
            ("huge", "acme", big.url),
            ("moved", "acme", moved.url),
        )
        assert wait_for(lambda: receiver.snapshot()), notify.tail()
        # The other tenant's webhook arrived before the trickling receiver was let go.
        assert slow.done == 0
        assert wait_for(lambda: slow.open == 1, 30)
        healthy_while_trickling.append(notify.healthy())
        rss_after = psutil.Process(notify.proc.pid).memory_info().rss
        status = statuses(env, 2)
        dead = reasons(env, DLQ, 1)
    finally:
        stop.set()
        notify.stop()
        for server in (admin, slow, big, moved):
            server.close()
    (fast,) = receiver.snapshot()
    assert fast.task_id == "fast" and verified_by_both(fast, "globex")
    assert healthy_while_trickling == [True]
    # The trickling receiver was cut at the deadline and goes up the ladder, not forever.
    assert status["slow"]["status"] == "retrying" and "deadline" in str(status["slow"]["reason"])
    # The redirect was not followed: the internal admin endpoint never saw a request.
    assert status["moved"]["status"] == "failed"
    assert "redirects are not followed" in dead["moved"] and admin.requests == []
    # The 256 MiB answer was read to a few KiB: notify's memory barely moved.
    assert rss_after - rss_before < 64 * 1024 * 1024, (rss_before, rss_after)
    notified = read_topics(
        env["CONVEYOR_KAFKA_BOOTSTRAP"], [env["CONVEYOR_TOPIC_PREFIX"] + NOTIFIED], expect=2
    )
    assert {(m.key() or b"").decode() for m in notified} == {"fast", "huge"}
