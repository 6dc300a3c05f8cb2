"""Sending webhooks: pinned to checked addresses, bounded in time and size, several at once.

Each delivery is checked by the `DestinationPolicy` and then connects only to the addresses the
check passed (the URL's host is still what the request names: `Host` header, TLS SNI and
certificate check), so DNS cannot change the target between check and connect. Redirects are
never followed (httpcore does not follow them; a 3xx answer is returned as it is). One deadline
bounds the whole delivery: connect, TLS, sending the body, and every read of the answer, so a
receiver that trickles a byte every few seconds is cut off when it passes. At most
`max_answer_bytes` of the answer are read; the rest is never fetched. A batch's deliveries run
concurrently on a bounded thread pool, so a slow receiver holds one worker, not the others.

A batch has a start window of one timeout: a delivery still queued when it closes is not sent
(it retries through the ladder, never having reached the receiver). A delivery that has started
keeps its own full deadline and its answer is waited for: cutting it at the batch's deadline
would report a failure for a webhook the receiver may already have acted on, and the retry would
repeat it. A batch therefore takes at most two timeouts (plus name-resolution grace).
"""

from __future__ import annotations

import base64
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpcore
from opentelemetry.trace import Span, SpanKind

from conveyor.errors import RetryableError
from conveyor.telemetry import tracing
from conveyor.webhooks.policy import Destination, DestinationPolicy, redact

log = logging.getLogger(__name__)
USER_AGENT = "Conveyor-Webhooks/1"
# getaddrinfo cannot be interrupted: a batch waits this much past the deadline for a delivery
# stuck in name resolution before reporting it as timed out (the worker then finishes alone).
RESOLVE_GRACE_S = 5.0
# A delivery with less time than this left is not started: it could not finish.
MIN_ATTEMPT_S = 0.1
ResultHook = Callable[[int, "int | Exception"], None]
_SOCKET_ERRORS = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError)


def batch_bound_s(timeout_s: float) -> float:
    """The longest one batch of deliveries takes: its start window, then the last delivery's
    own deadline, then the name-resolution grace."""
    return 2 * timeout_s + RESOLVE_GRACE_S


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """One webhook to send: where, what, and the trace it belongs to."""

    url: str
    body: bytes
    headers: Mapping[str, str]
    parent: Span | None = None  # the record's span: the webhook span is its child
    # The task's trace context, sent when no span of ours carries one (the SDK is off).
    traceparent: str | None = None
    tracestate: str | None = None
    attributes: Mapping[str, Any] = field(default_factory=dict)


class WebhookSender:
    """Delivers webhooks under the destination policy; returns an HTTP status or the error."""

    def __init__(
        self,
        policy: DestinationPolicy,
        *,
        timeout_s: float,
        max_answer_bytes: int,
        concurrency: int,
        ca_file: str | None = None,
    ) -> None:
        self.policy = policy
        self.timeout_s = timeout_s
        self.max_answer_bytes = max_answer_bytes
        self.ssl_context = ssl.create_default_context(cafile=ca_file or _certifi())
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="webhook")

    def deliver(
        self, requests: Sequence[WebhookRequest], on_result: ResultHook | None = None
    ) -> list[int | Exception]:
        """Send every request concurrently; each result is its status code or its error.

        `on_result(index, result)` is called in the caller's thread as each one finishes, so
        the caller can record an answer at once rather than after the slowest receiver: a crash
        then repeats only the webhooks still in flight.
        """
        # A webhook queued behind slow ones is not started once the batch's start window has
        # closed; one that has started runs to its own deadline (see the module docstring).
        not_after = time.monotonic() + self.timeout_s
        futures = {self._pool.submit(self.post, r, not_after): i for i, r in enumerate(requests)}
        results: list[int | Exception | None] = [None] * len(requests)
        bound = batch_bound_s(self.timeout_s)

        def record(index: int, result: int | Exception) -> None:
            results[index] = result
            if on_result is not None:
                on_result(index, result)

        try:
            for future in as_completed(futures, timeout=bound):
                record(futures[future], _outcome(future))
        except FutureTimeout:
            for future in futures:
                future.cancel()  # still queued behind slow ones: never sent, retried later
            for index, request in enumerate(requests):
                if results[index] is None:
                    late = f"webhook to {redact(request.url)} did not finish in time"
                    record(index, RetryableError(late))
        return [r for r in results if r is not None]

    def post(self, request: WebhookRequest, not_after: float | None = None) -> int:
        """One delivery, in its own CLIENT span; raises RetryableError or a policy refusal.

        It must end within the sender's timeout, and is not started after `not_after`
        (monotonic) when given.
        """
        now = time.monotonic()
        if not_after is not None and not_after - now < MIN_ATTEMPT_S:
            raise RetryableError(f"webhook to {redact(request.url)} waited past its deadline")
        deadline = now + self.timeout_s
        shown = redact(request.url)
        span = tracing.start_span(
            "webhook POST",
            parent=tracing.context_of(request.parent) if request.parent is not None else None,
            kind=SpanKind.CLIENT,
            attributes={"http.request.method": "POST", "url.full": shown, **request.attributes},
        )
        try:
            destination = self.policy.check(request.url)
            span.set_attribute("server.address", destination.host)
            span.set_attribute("server.port", destination.port)
            status = self._send(destination, request, _trace_headers(span, request), deadline)
            span.set_attribute("http.response.status_code", status)
        except Exception as exc:
            tracing.end_span(span, exc)
            raise
        tracing.end_span(span)
        return status

    def _send(
        self,
        destination: Destination,
        request: WebhookRequest,
        trace_headers: dict[str, str],
        deadline: float,
    ) -> int:
        # Host as the URL names it (httpcore would write an IPv6 literal without brackets).
        headers = {
            "Host": destination.authority,
            **request.headers,
            **trace_headers,
            "User-Agent": USER_AGENT,
        }
        if destination.userinfo:
            headers["Authorization"] = _basic(destination.userinfo)
        url = httpcore.URL(
            scheme=destination.scheme.encode(),
            host=destination.host.encode(),
            port=destination.port,
            target=destination.target.encode(),
        )
        backend = PinnedBackend(destination.addresses, deadline)
        timeouts = {k: self.timeout_s for k in ("connect", "read", "write", "pool")}
        try:
            with (
                httpcore.ConnectionPool(
                    ssl_context=self.ssl_context, network_backend=backend, max_connections=1
                ) as pool,
                pool.stream(
                    "POST",
                    url,
                    headers=list(headers.items()),
                    content=request.body,
                    extensions={"timeout": timeouts},
                ) as response,
            ):
                self._drain(response)
                return int(response.status)
        except _SOCKET_ERRORS as exc:
            late = " (deadline passed)" if time.monotonic() >= deadline else ""
            raise RetryableError(
                f"webhook to {redact(request.url)} failed: {type(exc).__name__}{late}"
            ) from exc

    def _drain(self, response: httpcore.Response) -> None:
        """Read at most `max_answer_bytes` of the answer; the rest is left unread."""
        read = 0
        for chunk in response.iter_stream():
            read += len(chunk)
            if read >= self.max_answer_bytes:
                break

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class PinnedBackend(httpcore.NetworkBackend):
    """Connects to the checked addresses only, and holds every socket operation to a deadline."""

    def __init__(self, addresses: Sequence[str], deadline: float) -> None:
        self.addresses = tuple(addresses)
        self.deadline = deadline
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        last: Exception | None = None
        for address in self.addresses:  # `host` was resolved and checked already: not again
            try:
                stream = self._inner.connect_tcp(
                    address,
                    port,
                    timeout=_remaining(self.deadline, timeout, httpcore.ConnectTimeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
                return DeadlineStream(stream, self.deadline)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        raise last if last is not None else httpcore.ConnectError("no address to connect to")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every read and write ends by the delivery's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        remaining = _remaining(self._deadline, timeout, httpcore.ReadTimeout)
        return self._inner.read(max_bytes, remaining)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _remaining(self._deadline, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        remaining = _remaining(self._deadline, timeout, httpcore.ConnectTimeout)
        tls = self._inner.start_tls(ssl_context, server_hostname, remaining)
        return DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _outcome(future: Future[int]) -> int | Exception:
    try:
        return future.result()
    except Exception as exc:
        return exc


def _remaining(deadline: float, timeout: float | None, error: type[Exception]) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("webhook delivery deadline passed")
    return left if timeout is None else min(timeout, left)


def _trace_headers(span: Span, request: WebhookRequest) -> dict[str, str]:
    """The receiver joins the task's trace: our span's context, else the task's own."""
    injected = {k: v.decode() for k, v in tracing.inject(span)}
    if injected or not request.traceparent:
        return injected
    carried = {"traceparent": request.traceparent}
    if request.tracestate:
        carried["tracestate"] = request.tracestate
    return carried


def _basic(userinfo: str) -> str:
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return f"Basic {token}"


def _certifi() -> str | None:
    try:
        import certifi

        return str(certifi.where())
    except ImportError:
        return None
