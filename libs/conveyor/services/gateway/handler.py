"""gateway's routes and what they decide: who the caller is, what a task may say, what they see.

The token names the tenant; a body naming another is 403. A task is (tenant, task id): another
tenant's equal id is a different task. Every field and parameter is checked against the ingress
contract and the pipeline's templates and models, and `callback_url` against the webhook
destination policy as far as it needs no DNS (`edge_refusal`), before anything is published (422
naming the fields). The task is then reserved in the store (`ResultStore.reserve`, an atomic
insert of a `pending` row, so replicas sharing the store agree), and published only by the call
that reserved it: POST answers 202 once the broker acknowledged the record; a repeat of the same
body by the same tenant answers 200 with the task as it stands (nothing is published again), a
different body under a taken id 409; a failed publish releases the reservation so the client may
retry. Status URLs are built on `public_base_url`, never on the request's Host header. GET and the
WebSocket read the result store, each tenant its own tasks only (another tenant's is 404, like an
unknown id), with a queue position estimate from the preprocess group's lag while `pending`.
The WebSocket authenticates by header or subprotocol, never by URL (`conveyor.web.auth`), is
capped per process and per tenant, polls the task's row every `ws_poll_s`, pushes each status or
stage change, and closes (1000) after the terminal one.
DELETE cancels the tenant's task (`conveyor.cancel.Canceller`, docs/cancellation.md): 200 with
`cancelled: true` once the cancel is recorded and published, the same on a repeat; 409 with
`cancelled: false` and the status for a task that finished first; 404 like GET.
The full contract and the reasons: docs/gateway.md.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from conveyor.admission import Admission, retry_after
from conveyor.cancel import Canceller
from conveyor.errors import BrokerError, PermanentError, RetryableError
from conveyor.events.ingress import InvalidTaskError, TaskRequest, parse_task
from conveyor.publisher import TaskPublisher
from conveyor.quota import SubmissionQuota, retry_after_header
from conveyor.services.gateway.settings import GatewaySettings
from conveyor.store import Reservation, ResultStore, TaskStatus, is_terminal
from conveyor.streaming.feed import StreamFeed
from conveyor.streaming.hub import StreamHub
from conveyor.streaming.sockets import pause, push_partial, start_feed
from conveyor.web.auth import (
    SUBPROTOCOL,
    TokenTable,
    bearer_token,
    offered_subprotocols,
    subprotocol_token,
)
from conveyor.web.body import read_json_body
from conveyor.web.expiring import ExpiringMap
from conveyor.web.metrics import WEBSOCKETS, RequestMetricsMiddleware
from conveyor.web.schema import (
    Submitted,
    openapi_document,
    pending_view,
    task_view,
    timeline_view,
)
from conveyor.webhooks.policy import edge_refusal

log = logging.getLogger(__name__)


class Gateway:
    """What the routes share: settings, tokens, publisher, store, queue estimate, liveness."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        publisher: TaskPublisher,
        store: ResultStore,
        queue_estimate: Callable[[], int | None],
        closers: tuple[Callable[[], None], ...] = (),
        quota: SubmissionQuota | None = None,
        admission: Admission | None = None,
        streams: StreamHub | None = None,
        feed: StreamFeed | None = None,
        canceller: Canceller | None = None,
    ) -> None:
        self.settings = settings
        self.tokens = TokenTable(settings.gateway_tokens)
        self.rules = settings.task_rules()
        self.publisher = publisher
        self.store = store
        self.queue_estimate = queue_estimate
        # (tenant, task id) -> what this replica published: the trace id, before the store has it.
        self.recent: ExpiringMap[tuple[str, str], Submitted] = ExpiringMap(
            ttl_s=settings.recent_ttl_s, max_size=settings.recent_max
        )
        self.closers = closers
        self.quota = quota  # per-tenant submission rate (docs/scheduling.md); None: unlimited
        self.admission = admission  # estimated start, deadline refusal; None: no estimate
        self.streams = streams  # streamed partial text (docs/streaming.md); None: not pushed
        self.feed = feed  # reads the stream topic into `streams`, started with the app
        self.canceller = canceller  # DELETE /v1/tasks/{id}; None: cancellation unavailable
        self.started = False
        self.heartbeat = float("-inf")  # monotonic time of the loop's last tick
        self.sockets = 0
        self.sockets_by_tenant: Counter[str] = Counter()

    def healthy(self) -> bool:
        return time.monotonic() - self.heartbeat < self.settings.health_stall_s

    def ready(self) -> bool:
        if not self.started:
            return False
        try:
            self.store.get("readyz-probe")  # any answer proves the store is reachable
        except Exception:
            return False
        return True

    async def tick(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            await asyncio.sleep(1.0)  # a ticker for /healthz, not synchronisation

    async def reserve(self, task: TaskRequest, digest: str) -> Reservation:
        """Take (tenant, task id) in the store, atomically across replicas."""
        return await run_in_threadpool(
            functools.partial(
                self.store.reserve,
                task.task_id,
                task.tenant,
                time=datetime.now(UTC),
                digest=digest,
                kind=task.kind,
                callback_url=task.callback_url,
            )
        )

    async def release(self, task: TaskRequest, digest: str) -> None:
        """Free a reservation whose publish failed, so the client may submit it again."""
        try:
            released = await run_in_threadpool(
                self.store.release, task.task_id, task.tenant, digest
            )
        except RetryableError as exc:  # the row stays pending; the client's retry gets 200
            log.warning("reservation not released task_id=%s error=%s", task.task_id, exc)
            return
        log.info("reservation released task_id=%s released=%s", task.task_id, released)

    async def view(self, task_id: str, tenant: str, *, timeline: bool) -> dict[str, Any] | None:
        """The task as its tenant sees it, or None (unknown, or another tenant's)."""
        record, events = await run_in_threadpool(self._read, task_id, tenant, timeline)
        sub = self.recent.get((tenant, task_id))
        if record is not None:
            out = task_view(record)
            if out["trace_id"] is None and sub is not None:
                out["trace_id"] = sub.trace_id  # a reservation, not yet seen by the pipeline
        elif sub is not None:
            out = pending_view(task_id, sub)
        else:
            return None
        if timeline:
            out["timeline"] = timeline_view(events)
        pending = out["status"] == TaskStatus.PENDING
        out["queue_position_estimate"] = (
            await run_in_threadpool(self.queue_estimate) if pending else None
        )
        lane = sub.priority if sub is not None else "normal"
        out["estimated_start"] = await self.estimated_start(lane) if queued(out) else None
        return out

    async def estimated_start(self, lane: str) -> str | None:
        """When inference should start a queued task: everything now waiting in its lane and
        above over the recent service rate (an upper bound once it has waited a while: some of
        that backlog arrived after it). The store does not keep the lane: the replica that
        accepted the task remembers it for a while, else "normal" (the default) is assumed."""
        if self.admission is None:
            return None
        verdict = await run_in_threadpool(self.admission.check, lane, None, datetime.now(UTC))
        return verdict.start.isoformat() if verdict.start is not None else None

    async def gone(self, task_id: str, tenant: str) -> JSONResponse:
        """The 404 of a task the tenant cannot see: expired under retention (with when), or
        unknown (another tenant's looks the same)."""
        expired_at = await run_in_threadpool(self.store.expired_at, task_id, tenant=tenant)
        if expired_at is None:
            return JSONResponse({"error": "task not found"}, 404)
        when = expired_at.isoformat()
        message = (
            f"task {task_id} expired at {when}: its result and timeline were deleted under "
            "the tenant's retention policy"
        )
        return JSONResponse({"error": message, "reason": "expired", "expired_at": when}, 404)

    def _read(self, task_id: str, tenant: str, timeline: bool) -> tuple[Any, list[Any]]:
        record = self.store.get(task_id, tenant=tenant)
        events = self.store.timeline(task_id, tenant=tenant) if timeline and record else []
        return record, events

    def close(self) -> None:
        if self.feed is not None:
            self.feed.stop()
        self.publisher.close()
        for close in self.closers:
            close()
        self.store.close()


def queued(view: dict[str, Any]) -> bool:
    """Not yet started by inference: pending, or preprocessed and waiting in a lane."""
    status, stage = view["status"], view.get("stage")
    return status == TaskStatus.PENDING or (
        status == TaskStatus.PROCESSING and stage == "preprocess"
    )


def _gateway(conn: Request | WebSocket) -> Gateway:
    gateway: Gateway = conn.app.state.gateway
    return gateway


def _tenant(request: Request) -> str:
    tenant = _gateway(request).tokens.tenant_for(bearer_token(request.headers.get("authorization")))
    if tenant is None:
        raise HTTPException(
            401, "missing or unknown bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    return tenant


def _invalid(exc: InvalidTaskError) -> Response:
    return JSONResponse({"error": str(exc), "fields": list(exc.fields)}, 422)


def status_url(settings: GatewaySettings, request: Request, task_id: str) -> str:
    """Where the task's status is read: on the configured public base URL, else a relative path
    (valid in `Location`); never built from the Host header, which any client can set."""
    path = request.app.url_path_for("task_status", task_id=task_id)
    return f"{settings.public_base_url or ''}{path}"


async def submit_task(request: Request) -> Response:
    gateway = _gateway(request)
    settings = gateway.settings
    tenant = _tenant(request)
    body = await read_json_body(
        request, limit=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    if not isinstance(body, dict):
        raise HTTPException(400, "task data must be a JSON object")
    if body.get("tenant") not in (None, tenant):
        raise HTTPException(403, "the task names another tenant than the token's")
    body["tenant"] = tenant
    if body.get("task_id") is None:
        body["task_id"] = str(uuid.uuid4())
    try:
        task = parse_task(body, gateway.rules)
    except InvalidTaskError as exc:
        return _invalid(exc)
    if task.callback_url and (refused := edge_refusal(task.callback_url, settings.webhook_allow)):
        return JSONResponse({"error": refused, "fields": ["callback_url"]}, 422)
    if gateway.quota is not None:
        refusal = await run_in_threadpool(gateway.quota.check, tenant)
        if refusal is not None:
            retry = retry_after_header(refusal)
            raise HTTPException(
                429, f"{refusal.message}: retry in {retry} s", {"Retry-After": retry}
            )
    admitted: dict[str, Any] = {}
    if gateway.admission is not None:
        verdict = await run_in_threadpool(
            gateway.admission.check, task.priority, task.deadline, datetime.now(UTC)
        )
        start = verdict.start.isoformat() if verdict.start is not None else None
        if not verdict.allowed:
            raise HTTPException(
                429,
                f"the deadline would pass before the task starts (estimated start {start})",
                {"Retry-After": retry_after(verdict)},
            )
        admitted = {"estimated_start": start, "queue_position_estimate": verdict.ahead}
    digest = submission_digest(body)
    reservation = await gateway.reserve(task, digest)
    if not reservation.new:
        return _repeat(request, reservation, digest)
    try:
        task_id, trace_id = await gateway.publisher.submit(body)
    except PermanentError as exc:  # e.g. the encoded record is over the stages' size limit
        await gateway.release(task, digest)
        raise HTTPException(422, str(exc)) from None
    except BaseException:  # the broker did not take it (or the request was cancelled)
        await asyncio.shield(gateway.release(task, digest))
        raise
    gateway.recent.put((tenant, task_id), Submitted(tenant, trace_id, time.time(), task.priority))
    url = status_url(settings, request, task_id)
    log.info("task accepted task_id=%s tenant=%s trace_id=%s", task_id, tenant, trace_id)
    return JSONResponse(
        {
            "task_id": task_id,
            "status": TaskStatus.PENDING.value,
            "status_url": url,
            "trace_id": trace_id,
            **admitted,
        },
        status_code=202,
        headers={"Location": url},
    )


def submission_digest(body: dict[str, Any]) -> str:
    """What makes two submissions "the same": the body as submitted (tenant and id filled in),
    in canonical JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _repeat(request: Request, reservation: Reservation, digest: str) -> Response:
    """The answer to a task id the tenant has already used: idempotent for the same body."""
    task = reservation.task
    if task.expired(datetime.now(UTC)):
        raise HTTPException(
            409,
            f"task {task.task_id} expired under the retention policy; its id stays taken: "
            "submit under a new id",
        )
    if reservation.digest != digest:
        raise HTTPException(409, f"task {task.task_id} already exists with a different submission")
    gateway = _gateway(request)
    url = status_url(gateway.settings, request, task.task_id)
    trace_id = task.trace_id
    if trace_id is None and (sub := gateway.recent.get((task.tenant or "", task.task_id))):
        trace_id = sub.trace_id
    log.info("task repeated task_id=%s tenant=%s status=%s", task.task_id, task.tenant, task.status)
    return JSONResponse(
        {"task_id": task.task_id, "status": task.status, "status_url": url, "trace_id": trace_id},
        status_code=200,
        headers={"Location": url},
    )


async def task_status(request: Request) -> Response:
    tenant = _tenant(request)
    gateway, task_id = _gateway(request), request.path_params["task_id"]
    view = await gateway.view(task_id, tenant, timeline=True)
    if view is None:
        return await gateway.gone(task_id, tenant)
    return JSONResponse(view)


async def cancel_task(request: Request) -> Response:
    gateway = _gateway(request)
    tenant = _tenant(request)
    if gateway.canceller is None:
        raise HTTPException(501, "cancellation is not configured on this gateway")
    task_id = request.path_params["task_id"]
    answer = await run_in_threadpool(gateway.canceller.cancel, task_id, tenant)
    if answer is None:
        raise HTTPException(404, "task not found")
    view = answer.view()
    log.info("task cancel task_id=%s tenant=%s cancelled=%s", task_id, tenant, answer.cancelled)
    if not answer.cancelled:
        error = f"task already {answer.task.status}: nothing to cancel"
        return JSONResponse({"error": error, **view}, 409)
    return JSONResponse(view)


async def task_events(ws: WebSocket) -> None:
    gateway = _gateway(ws)
    if "token" in ws.query_params:
        return await _deny(
            ws,
            401,
            "tokens in URLs are refused: use the Authorization header "
            f"or the {SUBPROTOCOL} + bearer.<base64url token> subprotocols",
        )
    offered = offered_subprotocols(ws.headers.get("sec-websocket-protocol"))
    token = bearer_token(ws.headers.get("authorization")) or subprotocol_token(offered)
    tenant = gateway.tokens.tenant_for(token)
    if tenant is None:
        return await _deny(ws, 401, "missing or unknown bearer token")
    task_id = ws.path_params["task_id"]
    view = await gateway.view(task_id, tenant, timeline=False)
    if view is None:
        gone = await gateway.gone(task_id, tenant)
        return await _deny(ws, 404, json.loads(bytes(gone.body))["error"])
    if gateway.sockets_by_tenant[tenant] >= gateway.settings.ws_max_per_tenant:
        return await _deny(ws, 429, "too many open WebSockets for this tenant")
    if gateway.sockets >= gateway.settings.ws_max_connections:
        return await _deny(ws, 503, "too many open WebSockets")
    _opened(gateway, tenant, +1)  # the slot is taken before the next await: no overshoot
    try:
        # The token's subprotocol is never selected: the answer would echo it.
        await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        await _follow(ws, gateway, task_id, tenant, view)
    except WebSocketDisconnect:
        pass  # the client left
    finally:
        _opened(gateway, tenant, -1)


def _opened(gateway: Gateway, tenant: str, delta: int) -> None:
    gateway.sockets += delta
    gateway.sockets_by_tenant[tenant] += delta
    if not gateway.sockets_by_tenant[tenant]:
        del gateway.sockets_by_tenant[tenant]
    WEBSOCKETS.inc(delta)


async def _deny(ws: WebSocket, status: int, message: str) -> None:
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse({"error": message}, status_code=status))
    else:  # a server without denial responses: close the handshake (policy / try again later)
        await ws.close(1013 if status in (429, 503) else 1008, message)


async def _follow(
    ws: WebSocket, gateway: Gateway, task_id: str, tenant: str, view: dict[str, Any]
) -> None:
    left = asyncio.ensure_future(_until_disconnect(ws))
    # Partial text of a streaming task, between the status messages (conveyor.streaming.sockets).
    stream = gateway.streams.subscribe(tenant, task_id) if gateway.streams else None
    deadline = time.monotonic() + gateway.settings.ws_max_s
    sent: tuple[Any, Any] | None = None
    try:
        while True:
            if (view["status"], view["stage"]) != sent:
                final = is_terminal(view["status"])
                await push_partial(ws, stream)
                await ws.send_json({**view, "final": final})
                sent = (view["status"], view["stage"])
                if final:
                    return await ws.close(1000, "terminal status")
            if time.monotonic() >= deadline:
                return await ws.close(1000, "time limit reached; reconnect to follow on")
            if await pause(ws, left, stream, gateway.settings.ws_poll_s):
                return
            view = await _poll(gateway, task_id, tenant) or view
    finally:
        left.cancel()
        if stream is not None:
            stream.close()


async def _poll(gateway: Gateway, task_id: str, tenant: str) -> dict[str, Any] | None:
    try:
        return await gateway.view(task_id, tenant, timeline=False)
    except RetryableError as exc:  # the store is briefly unavailable: keep the socket, try again
        log.warning("task poll failed task_id=%s error=%s", task_id, exc)
        return None


async def _until_disconnect(ws: WebSocket) -> None:
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass  # clients have nothing to say; their messages are ignored


async def healthz(request: Request) -> Response:
    ok = _gateway(request).healthy()
    return PlainTextResponse("ok\n" if ok else "unavailable\n", 200 if ok else 503)


async def readyz(request: Request) -> Response:
    ok = await run_in_threadpool(_gateway(request).ready)
    return PlainTextResponse("ok\n" if ok else "unavailable\n", 200 if ok else 503)


async def metrics(_request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def openapi(_request: Request) -> Response:
    return JSONResponse(openapi_document())


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def _unavailable(_request: Request, exc: Exception) -> Response:
    log.warning("dependency unavailable error=%s", exc)
    return JSONResponse(
        {"error": f"temporarily unavailable: {exc}"}, 503, headers={"Retry-After": "1"}
    )


def build_app(gateway: Gateway) -> Starlette:
    from conveyor.services.gateway.batches import (  # they import this module
        batch_routes,
        batch_work_forever,
    )

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if not len(gateway.tokens):
            log.warning("no gateway tokens configured: every call will be 401")
        gateway.publisher.start()
        if gateway.feed is not None and gateway.streams is not None:
            await start_feed(gateway.feed, gateway.streams)
        ticker = asyncio.ensure_future(gateway.tick())
        sweeper = asyncio.ensure_future(batch_work_forever(gateway))
        gateway.started = True
        try:
            yield
        finally:
            gateway.started = False
            ticker.cancel()
            sweeper.cancel()
            await run_in_threadpool(gateway.close)

    app = Starlette(
        routes=[
            Route("/v1/tasks", submit_task, methods=["POST"]),
            *batch_routes(),
            Route("/v1/tasks/{task_id}", task_status, methods=["GET"], name="task_status"),
            Route("/v1/tasks/{task_id}", cancel_task, methods=["DELETE"]),
            WebSocketRoute("/v1/tasks/{task_id}/events", task_events),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/openapi.json", openapi),
        ],
        middleware=[Middleware(RequestMetricsMiddleware)],
        exception_handlers={
            HTTPException: _http_error,
            BrokerError: _unavailable,
            RetryableError: _unavailable,
        },
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app
