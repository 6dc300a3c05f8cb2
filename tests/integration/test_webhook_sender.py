"""The webhook sender against real HTTP servers on 127.0.0.1: policy, pinning, bounds, redirects.

No broker: these drive `WebhookSender` directly (what notify calls), with receivers that
misbehave the ways the security review found: a loopback target, a 256 MiB answer, a receiver
trickling one byte a second, a redirect to an internal address.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from conveyor.errors import RetryableError
from conveyor.webhooks.policy import DestinationPolicy, DestinationRefusedError
from conveyor.webhooks.sender import WebhookRequest, WebhookSender
from tests.httpservers import Behaviour, Server, ok


@pytest.fixture
def servers() -> Iterator[Callable[[Behaviour], Server]]:
    made: list[Server] = []

    def make(behaviour: Behaviour) -> Server:
        made.append(Server(behaviour))
        return made[-1]

    yield make
    for server in made:
        server.close()


def sender(*allow: str, timeout_s: float = 10.0, **policy_args: object) -> WebhookSender:
    policy = DestinationPolicy(list(allow), **policy_args)  # type: ignore[arg-type]
    return WebhookSender(policy, timeout_s=timeout_s, max_answer_bytes=4096, concurrency=4)


def request(url: str) -> WebhookRequest:
    return WebhookRequest(url, b'{"task_id":"t"}', {"Content-Type": "application/json"})


def test_a_loopback_receiver_is_refused_by_default_and_reached_once_allowlisted(
    servers: Callable[[Behaviour], Server],
) -> None:
    server = servers(ok)
    for url in (server.url, f"http://127.1:{server.port}/", f"http://localhost:{server.port}/"):
        (result,) = sender().deliver([request(url)])
        assert isinstance(result, DestinationRefusedError), url
        assert "loopback" in str(result) and "token" not in str(result)
    assert server.requests == []
    assert sender("127.0.0.1/32").deliver([request(server.url)]) == [204]
    assert len(server.requests) == 1


def test_the_connection_goes_to_the_checked_address_with_the_url_host_in_host(
    servers: Callable[[Behaviour], Server],
) -> None:
    server = servers(ok)
    lookups: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"] if len(lookups) == 1 else ["10.0.0.1"]  # a rebinding answer

    hooks = sender("127.0.0.1/32", resolver=resolve)
    assert hooks.deliver([request(f"http://hooks.test:{server.port}/h")]) == [204]
    assert lookups == ["hooks.test"]  # resolved once, checked, connected to: no second lookup
    assert server.requests[0]["host"] == f"hooks.test:{server.port}"


def test_a_huge_answer_is_read_to_a_few_kib_only(servers: Callable[[Behaviour], Server]) -> None:
    chunk = b"x" * 65536

    def huge(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(256 * 1024 * 1024))
        handler.end_headers()
        for _ in range(4096):  # 256 MiB, unless the sender hangs up first
            handler.wfile.write(chunk)
            server.sent += len(chunk)

    server = servers(huge)
    assert sender("127.0.0.1/32").deliver([request(server.url)]) == [200]
    deadline = time.monotonic() + 30
    while server.open and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.open == 0
    # What the kernel's socket buffers took before the sender closed, never the 256 MiB.
    assert server.sent < 64 * 1024 * 1024, server.sent


def test_a_trickling_receiver_is_cut_at_the_deadline_without_holding_the_others(
    servers: Callable[[Behaviour], Server],
) -> None:
    stop = threading.Event()

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"z" * 600:  # ~10 min at one byte a second
            if stop.wait(1.0):
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()

    slow = servers(trickle)
    answered_at: list[float] = []

    def fast_ok(handler: BaseHTTPRequestHandler) -> None:
        answered_at.append(time.monotonic())
        ok(handler)

    fast = servers(fast_ok)
    hooks = sender("127.0.0.1/32", timeout_s=6.0)
    slow_deadline = time.monotonic() + 6.0
    try:
        results = hooks.deliver([request(slow.url), request(fast.url)])
    finally:
        stop.set()
    assert isinstance(results[0], RetryableError) and "deadline" in str(results[0])
    assert results[1] == 204
    # Sent side by side: the other receiver had its webhook before the slow one's deadline
    # (one after the other, it would have waited for that deadline).
    assert len(answered_at) == 1 and answered_at[0] < slow_deadline


def test_redirects_are_returned_not_followed(servers: Callable[[Behaviour], Server]) -> None:
    target = servers(ok)

    def redirect(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", f"http://127.0.0.1:{target.port}/admin")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    source = servers(redirect)
    assert sender("127.0.0.1/32").deliver([request(source.url)]) == [302]
    assert target.requests == []


def test_an_unreachable_receiver_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connection refused
        (result,) = sender("127.0.0.1/32").deliver([request(f"http://127.0.0.1:{port}/")])
    assert isinstance(result, RetryableError)


def test_an_ipv6_literal_url_is_refused_or_named_with_brackets(
    servers: Callable[[Behaviour], Server],
) -> None:
    server = servers(ok)
    url = f"http://[::ffff:127.0.0.1]:{server.port}/h"
    assert isinstance(sender().deliver([request(url)])[0], DestinationRefusedError)
    assert sender("127.0.0.1/32").deliver([request(url)]) == [204]  # judged and sent as IPv4
    assert server.requests[0]["host"] == f"[::ffff:127.0.0.1]:{server.port}"


def test_a_batch_ends_within_one_deadline_even_when_slow_receivers_fill_every_worker(
    servers: Callable[[Behaviour], Server],
) -> None:
    stop = threading.Event()

    def hang(handler: BaseHTTPRequestHandler) -> None:
        stop.wait(120)

    slow = servers(hang)
    hooks = WebhookSender(
        DestinationPolicy(["127.0.0.1/32"]), timeout_s=2.0, max_answer_bytes=4096, concurrency=2
    )
    try:
        results = hooks.deliver([request(slow.url) for _ in range(6)])
    finally:
        stop.set()
    hooks.close()
    # The two sent ran into the batch's deadline; the four queued behind them had none left:
    # they were never sent (and are retried later), so nothing goes out after the batch.
    assert all(isinstance(r, RetryableError) for r in results)
    assert len(slow.requests) == 2, len(slow.requests)


def test_a_delivery_started_late_in_the_batch_keeps_its_own_full_deadline(
    servers: Callable[[Behaviour], Server],
) -> None:
    # One worker, two webhooks to a receiver that takes 1.5 s: the second starts 1.5 s into the
    # batch's 3 s start window and ends after it. Cutting it at the batch's deadline would report
    # a failure for a webhook the receiver had already acted on, and its retry would repeat it.
    def slow_ok(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(1.5)
        ok(handler)

    server = servers(slow_ok)
    hooks = WebhookSender(
        DestinationPolicy(["127.0.0.1/32"]), timeout_s=3.0, max_answer_bytes=4096, concurrency=1
    )
    try:
        results = hooks.deliver([request(server.url), request(server.url)])
    finally:
        hooks.close()
    assert results == [204, 204]
    assert len(server.requests) == 2
