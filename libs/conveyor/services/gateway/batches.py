"""gateway's batch routes and its paced dispatcher: many tasks as one JSONL file, followed,
cancelled, listed and collected as one.

`POST /v1/batches` reads the file (`batch_max_bytes`, `batch_max_tasks`), checks every line
(`conveyor.batches.jsonl`: 422 listing the bad lines, nothing is created), records the batch,
its items, each task's body and a reservation of every task in one store transaction, and
answers 202 with the batch object at once. The tasks are published by the `Dispatcher` (one per
replica, all sharing the store): in input order, low lane unless a line says otherwise, keeping
at most `batch_in_flight` dispatched-but-unfinished batch tasks in the whole deployment, so no
queue anywhere holds more than that many batch records ahead of interactive tasks
(`conveyor.store.dispatch`). The tenant's submission quota counts the file as one request; the
deadline admission check is not applied (a task the window does not reach ends `expired`).
`GET /v1/batches` lists the caller's batches, `GET /v1/batches/{id}` shows progress, `POST
/v1/batches/{id}/cancel` cancels (dispatch stops; never-dispatched tasks end `cancelled` in the
store, dispatched ones through the ordinary task cancel), `GET /v1/batches/{id}/results` streams
one JSON line per input line, in input order. Every read brings the batch up to date first
(`conveyor.batches.lifecycle.refresh`). A tenant sees its own batches only (another's is 404).
docs/batches.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import weakref
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, cast

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from conveyor.batches import lifecycle
from conveyor.batches.jsonl import BatchInput, InvalidBatchError, parse_batch
from conveyor.batches.views import batch_view, result_line
from conveyor.errors import PermanentError
from conveyor.quota import retry_after_header
from conveyor.services.gateway.handler import Gateway, _gateway, _tenant, submission_digest
from conveyor.store.batches import BatchRecord, BatchStore
from conveyor.store.dispatch import DispatchItem, DispatchStore
from conveyor.web.body import read_body
from conveyor.webhooks.policy import edge_refusal

log = logging.getLogger(__name__)

JSONL_TYPES = frozenset({"application/jsonl", "application/x-ndjson", "application/x-jsonlines"})
RESULTS_PAGE = 1000  # result lines read from the store per query while streaming
MAX_METADATA_KEYS = 16
LIST_LIMIT, LIST_MAX = 20, 100  # GET /v1/batches: OpenAI's default and maximum page
# A claim outlives any publish (the publisher gives up on an acknowledgement after seconds), so
# it lapses only when its replica died midway; the items are then claimed again.
CLAIM_LEASE_S = 60.0
# Room is refilled once a quarter of the window is free (or nothing is in flight): the stages
# then get the batch in chunks they handle as batches, not a trickle of one-record batches.
REFILL_FRACTION = 4
# After the broker refused a round, the released items wait this long before the next try.
BROKER_BACKOFF_S = 1.0
# Dispatchers of this process, so a new batch can wake its gateway's at once.
_DISPATCHERS: weakref.WeakKeyDictionary[Gateway, Dispatcher] = weakref.WeakKeyDictionary()


def _store(gateway: Gateway) -> lifecycle.Store:
    store = gateway.store
    # Both backends are both; a fake might not be.
    if not isinstance(store, BatchStore) or not isinstance(store, DispatchStore):
        raise HTTPException(501, "this gateway's store does not keep batches")
    return cast(lifecycle.Store, store)


async def submit_batch(request: Request) -> Response:
    gateway = _gateway(request)
    settings = gateway.settings
    tenant = _tenant(request)
    store = _store(gateway)
    window = request.query_params.get("completion_window", lifecycle.DEFAULT_WINDOW)
    try:
        expires_in = lifecycle.parse_window(window)
    except ValueError as exc:
        return JSONResponse({"error": str(exc), "fields": ["completion_window"]}, 422)
    metadata = _metadata(request.query_params.get("metadata"))
    data = await read_body(
        request,
        media_types=JSONL_TYPES,
        limit=settings.batch_max_bytes,
        timeout_s=settings.batch_body_timeout_s,
    )
    if gateway.quota is not None:
        refusal = await run_in_threadpool(gateway.quota.check, tenant)
        if refusal is not None:
            retry = retry_after_header(refusal)
            raise HTTPException(
                429, f"{refusal.message}: retry in {retry} s", {"Retry-After": retry}
            )
    now = datetime.now(UTC)
    batch_id = lifecycle.new_batch_id()
    spec = BatchInput(
        tenant=tenant,
        expires_at=now + expires_in,
        task_id=functools.partial(lifecycle.batch_task_id, batch_id),
        rules=gateway.rules,
        max_tasks=settings.batch_max_tasks,
        check_callback=functools.partial(_refusal, allow=tuple(settings.webhook_allow)),
    )
    try:
        lines = await run_in_threadpool(parse_batch, data, spec)
    except InvalidBatchError as exc:
        errors = [e.view() for e in exc.errors]
        return JSONResponse({"error": str(exc), "error_count": exc.count, "errors": errors}, 422)
    create = functools.partial(
        lifecycle.create,
        store,
        lines,
        batch_id=batch_id,
        tenant=tenant,
        window=window,
        now=now,
        digest=submission_digest,
        metadata=metadata,
    )
    batch = await run_in_threadpool(create)
    wake_dispatcher(gateway)
    view = await _view(request, store, batch)
    log.info("batch accepted batch_id=%s tenant=%s tasks=%d", batch_id, tenant, len(lines))
    return JSONResponse(view, 202, headers={"Location": str(view["status_url"])})


def _refusal(url: str, *, allow: tuple[str, ...]) -> str | None:
    return edge_refusal(url, allow)


def _metadata(raw: str | None) -> dict[str, str] | None:
    """`metadata` query parameter: a JSON object of up to 16 short strings, as OpenAI's."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if (
        not isinstance(value, dict)
        or len(value) > MAX_METADATA_KEYS
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in value.items()
        )
    ):
        raise HTTPException(
            422, "metadata must be a JSON object of up to 16 strings (keys 64, values 512 chars)"
        )
    return value


async def _view(request: Request, store: lifecycle.Store, batch: BatchRecord) -> dict[str, Any]:
    counts = await run_in_threadpool(store.batch_counts, batch.tenant, batch.batch_id)
    settings = _gateway(request).settings
    base = settings.public_base_url or ""
    status_path = request.app.url_path_for("batch_status", batch_id=batch.batch_id)
    results_path = request.app.url_path_for("batch_results", batch_id=batch.batch_id)
    view = batch_view(batch, counts, results_url=f"{base}{results_path}")
    return {**view, "status_url": f"{base}{status_path}"}


async def _batch(request: Request) -> tuple[lifecycle.Store, BatchRecord]:
    """The caller's batch named in the path, brought up to date; 404 for any other."""
    store = _store(_gateway(request))
    tenant = _tenant(request)
    batch_id = request.path_params["batch_id"]
    batch = await run_in_threadpool(store.get_batch, tenant, batch_id)
    if batch is None:
        raise HTTPException(404, "batch not found")
    now = datetime.now(UTC)
    batch = await run_in_threadpool(lifecycle.refresh, store, batch, now, _canceller(request))
    return store, batch


async def batch_status(request: Request) -> Response:
    store, batch = await _batch(request)
    return JSONResponse(await _view(request, store, batch))


async def list_batches(request: Request) -> Response:
    """The caller's batches, newest first, as OpenAI's list: `limit` (1-100, 20) and `after`
    (the last id of the previous page)."""
    store = _store(_gateway(request))
    tenant = _tenant(request)
    raw = request.query_params.get("limit", str(LIST_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= LIST_MAX:
        return JSONResponse(
            {"error": f"limit must be a whole number from 1 to {LIST_MAX}", "fields": ["limit"]},
            422,
        )
    after = request.query_params.get("after")
    page = functools.partial(store.list_batches, tenant, limit=int(raw) + 1, after=after)
    batches = await run_in_threadpool(page)
    now = datetime.now(UTC)
    data = []
    for batch in batches[: int(raw)]:
        batch = await run_in_threadpool(lifecycle.refresh, store, batch, now, _canceller(request))
        data.append(await _view(request, store, batch))
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(batches) > int(raw),
        }
    )


def _canceller(request: Request) -> lifecycle.CancelTask | None:
    canceller = _gateway(request).canceller
    return None if canceller is None else canceller.cancel


async def cancel_batch(request: Request) -> Response:
    store, batch = await _batch(request)
    cancel = functools.partial(
        lifecycle.cancel, store, batch, datetime.now(UTC), _canceller(request)
    )
    batch = await run_in_threadpool(cancel)
    log.info(
        "batch cancel batch_id=%s tenant=%s status=%s", batch.batch_id, batch.tenant, batch.status
    )
    return JSONResponse(await _view(request, store, batch))


async def batch_results(request: Request) -> Response:
    store, batch = await _batch(request)
    return StreamingResponse(_result_lines(store, batch), media_type="application/jsonl")


async def _result_lines(store: lifecycle.Store, batch: BatchRecord) -> AsyncIterator[str]:
    after = 0
    # Bounded by the batch's size: each page moves past at least one line, or ends the stream.
    for _ in range(batch.total // RESULTS_PAGE + 2):
        page = await run_in_threadpool(
            functools.partial(
                store.batch_results,
                batch.tenant,
                batch.batch_id,
                after_line=after,
                limit=RESULTS_PAGE,
            )
        )
        if not page:
            return
        yield "".join(result_line(item, task) for item, task in page)
        after = page[-1][0].line


async def batch_work_forever(gateway: Gateway) -> None:
    """The batch work a gateway replica does in the background: the dispatcher and the sweep
    (none when its store keeps no batches)."""
    if not isinstance(gateway.store, BatchStore):
        return
    dispatcher = Dispatcher(gateway)
    _DISPATCHERS[gateway] = dispatcher
    await asyncio.gather(dispatcher.run(), sweep_forever(gateway))


async def sweep_forever(gateway: Gateway) -> None:
    """End the batches left past their window or mid-cancel that nobody reads (every replica
    may run it: ending a task is idempotent)."""
    store = _store(gateway)
    canceller = None if gateway.canceller is None else gateway.canceller.cancel
    while True:
        await asyncio.sleep(gateway.settings.batch_sweep_s)
        sweep = functools.partial(lifecycle.sweep, store, datetime.now(UTC), cancel_task=canceller)
        try:
            ended = await run_in_threadpool(sweep)
        except Exception as exc:  # the store is briefly unavailable: the next round retries
            log.warning("batch sweep failed error=%s", exc)
            continue
        if ended:
            log.info("batch sweep ended=%d", ended)


def wake_dispatcher(gateway: Gateway) -> None:
    """A batch was created: start publishing it now, not at the next poll."""
    dispatcher = _DISPATCHERS.get(gateway)
    if dispatcher is not None:
        dispatcher.wake.set()


class Dispatcher:
    """Publishes batch tasks at the pace the pipeline finishes them (docs/batches.md, "Paced
    dispatch"). Each round claims what the window has free (`DispatchStore.claim_dispatch`),
    publishes it concurrently and records the outcome: published, refused alone (the task ends
    `failed`), or not acknowledged (released, retried after `BROKER_BACKOFF_S`). Every replica
    runs one; the store's claim keeps them from publishing an item twice or overfilling the
    window."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.store = _store(gateway)
        self.wake = asyncio.Event()
        in_flight = gateway.settings.batch_in_flight
        self.window = in_flight or None  # 0: unbounded (everything at once, as before pacing)
        self.min_free = max(1, in_flight // REFILL_FRACTION)

    async def run(self) -> None:
        while True:
            try:
                published, refused = await self.round()
            except Exception as exc:  # the store is briefly unavailable: try again shortly
                log.warning("batch dispatch failed error=%s", exc)
                published, refused = 0, True
            if published and not refused:
                continue  # more may be free already (an unbounded window, or tasks ended)
            pause = BROKER_BACKOFF_S if refused else self.gateway.settings.batch_dispatch_poll_s
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), pause)

    async def round(self) -> tuple[int, bool]:
        """One claim published; (tasks published, whether the broker refused any)."""
        claim = functools.partial(
            self.store.claim_dispatch,
            window=self.window,
            min_free=self.min_free,
            lease_s=CLAIM_LEASE_S,
            now=datetime.now(UTC),
        )
        items: list[DispatchItem] = await run_in_threadpool(claim)
        if not items:
            return 0, False
        publisher = self.gateway.publisher
        outcomes = await asyncio.gather(
            *(publisher.submit(item.body) for item in items), return_exceptions=True
        )
        sent = [i for i, o in zip(items, outcomes, strict=True) if not isinstance(o, BaseException)]
        refused = [
            (i, o) for i, o in zip(items, outcomes, strict=True) if isinstance(o, PermanentError)
        ]
        retry = [
            (i, o)
            for i, o in zip(items, outcomes, strict=True)
            if isinstance(o, BaseException) and not isinstance(o, PermanentError)
        ]
        finish = functools.partial(
            self.store.finish_dispatch,
            dispatched=sent,
            done=[i for i, _ in refused],
            released=[i for i, _ in retry],
        )
        await run_in_threadpool(finish)
        for item, error in refused:  # each alone: the batch goes on
            await run_in_threadpool(self._fail, item, str(error))
        if retry:
            log.warning(
                "batch dispatch not acknowledged tasks=%d error=%s (released, retried)",
                len(retry),
                retry[0][1],
            )
        return len(sent), bool(retry)

    def _fail(self, item: DispatchItem, reason: str) -> None:
        batch = self.store.get_batch(item.tenant, item.batch_id)
        if batch is not None:
            lifecycle.fail_task(self.store, batch, item.task_id, reason)


def batch_routes() -> list[Route]:
    return [
        Route("/v1/batches", submit_batch, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", batch_status, methods=["GET"], name="batch_status"),
        Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
        Route(
            "/v1/batches/{batch_id}/results", batch_results, methods=["GET"], name="batch_results"
        ),
    ]
