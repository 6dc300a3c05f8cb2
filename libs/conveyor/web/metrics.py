"""Request metrics and the access log of an ASGI front end (the gateway), as plain ASGI middleware.

`conveyor_gateway_requests_total{route,code}` counts every HTTP request and WebSocket handshake by
route *template* (`/v1/tasks/{task_id}`, never the raw path, which would give one series per task)
and status code: a WebSocket counts `101` when accepted, or the status it was denied with.
The access log line carries the route template too, never the query string, which may hold a
WebSocket token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUESTS = Counter(
    "conveyor_gateway_requests",
    "HTTP requests and WebSocket handshakes by route and status code",
    ["route", "code"],
)
REQUEST_DURATION = Histogram(
    "conveyor_gateway_request_duration_seconds",
    "Time to answer an HTTP request",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
WEBSOCKETS = Gauge("conveyor_gateway_websockets", "WebSocket connections open")

UNMATCHED = "unmatched"  # no route: 404s for arbitrary paths share one series


def route_of(scope: Scope) -> str:
    """The template of the route that handled `scope` (set by Starlette's router)."""
    return str(getattr(scope.get("route"), "path", UNMATCHED))


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 500  # an exception before any response is what the server answers
        start = time.perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            seconds = time.perf_counter() - start
            route = route_of(scope)
            REQUESTS.labels(route, str(status)).inc()
            REQUEST_DURATION.labels(route).observe(seconds)
            log.info(
                "request method=%s route=%s code=%d ms=%.1f",
                scope.get("method"),
                route,
                status,
                seconds * 1000,
            )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome: str | None = None

        async def send_and_note(message: Message) -> None:
            nonlocal outcome
            if outcome is None:
                outcome = _handshake_code(message)
                if outcome is not None:
                    REQUESTS.labels(route_of(scope), outcome).inc()
                    log.info("websocket route=%s code=%s", route_of(scope), outcome)
            await send(message)

        await self.app(scope, receive, send_and_note)


def _handshake_code(message: Message) -> str | None:
    kind = message["type"]
    if kind == "websocket.accept":
        return "101"
    if kind == "websocket.http.response.start":
        return str(message["status"])
    if kind == "websocket.close":
        return "403"  # closed before accepting: servers answer the handshake with 403
    return None
