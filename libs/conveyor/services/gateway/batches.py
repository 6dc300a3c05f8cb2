"""gateway's batch routes: many tasks as one JSONL file, followed, cancelled and collected as one.

`POST /v1/batches` reads the file (`batch_max_bytes`, `batch_max_tasks`), checks every line
(`conveyor.batches.jsonl`: 422 listing the bad lines, nothing is created), records the batch,
its items and a reservation of every task in one store transaction, publishes the tasks (low
lane unless a line says otherwise) and answers 202 with the batch object once the broker has
acknowledged them all. The tenant's submission quota counts the file as one request; the
deadline admission check is not applied (a task the window does not reach ends `expired`). If the
broker stops acknowledging midway, the unpublished tasks end `failed`, the batch `failed`, and the
answer is 503 with the batch object (the tasks already published still run). `GET
/v1/batches/{id}` shows progress, `POST /v1/batches/{id}/cancel` cancels, `GET
/v1/batches/{id}/results` streams one JSON line per input line, in input order. Every read brings
the batch up to date first (`conveyor.batches.lifecycle.refresh`). A tenant sees its own batches
only (another's is 404). docs/batches.md.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from conveyor.batches import lifecycle
from conveyor.batches.jsonl import BatchInput, BatchLine, InvalidBatchError, parse_batch
from conveyor.batches.views import batch_view, result_line
from conveyor.errors import PermanentError
from conveyor.quota import retry_after_header
from conveyor.services.gateway.handler import Gateway, _gateway, _tenant, submission_digest
from conveyor.store.batches import BatchRecord, BatchStore
from conveyor.web.body import read_body
from conveyor.webhooks.policy import edge_refusal

log = logging.getLogger(__name__)

JSONL_TYPES = frozenset({"application/jsonl", "application/x-ndjson", "application/x-jsonlines"})
# Tasks awaiting their broker acknowledgement at once: enough to keep the producer's batches
# full, few enough that one slow acknowledgement does not hold thousands of futures.
PUBLISH_WINDOW = 1000
RESULTS_PAGE = 1000  # result lines read from the store per query while streaming
MAX_METADATA_KEYS = 16


def _store(gateway: Gateway) -> lifecycle.Store:
    store = gateway.store
    if not isinstance(store, BatchStore):  # both backends are; a fake might not be
        raise HTTPException(501, "this gateway's store does not keep batches")
    return store  # mypy narrows it to ResultStore and BatchStore


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
    failure = await _publish(gateway, store, batch, lines)
    batch = await _reread(store, batch)
    view = await _view(request, store, batch)
    url = str(view["status_url"])
    if failure is not None:
        return JSONResponse(view, 503, headers={"Retry-After": "1", "Location": url})
    log.info("batch accepted batch_id=%s tenant=%s tasks=%d", batch_id, tenant, len(lines))
    return JSONResponse(view, 202, headers={"Location": url})


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


async def _publish(
    gateway: Gateway, store: lifecycle.Store, batch: BatchRecord, lines: Sequence[BatchLine]
) -> str | None:
    """Publish every task, `PUBLISH_WINDOW` at a time; the error that stopped it, or None.

    A task the client refuses alone (over the record size limit) ends `failed` by itself; a
    broker that does not acknowledge ends the batch (`lifecycle.fail`)."""
    refused: list[tuple[str, str]] = []
    for start in range(0, len(lines), PUBLISH_WINDOW):
        window = lines[start : start + PUBLISH_WINDOW]
        outcomes = await asyncio.gather(
            *(gateway.publisher.submit(line.body) for line in window), return_exceptions=True
        )
        broken: BaseException | None = None
        for line, outcome in zip(window, outcomes, strict=True):
            if isinstance(outcome, PermanentError):
                refused.append((line.task.task_id, str(outcome)))
            elif isinstance(outcome, BaseException):
                broken = broken or outcome
                refused.append((line.task.task_id, str(outcome)))
        if broken is not None:
            rest = [line.task.task_id for line in lines[start + PUBLISH_WINDOW :]]
            unpublished = [task_id for task_id, _ in refused] + rest
            error = f"{type(broken).__name__}: {broken}"
            log.warning("batch publish failed batch_id=%s error=%s", batch.batch_id, error)
            now = datetime.now(UTC)
            await run_in_threadpool(lifecycle.fail, store, batch, unpublished, error, now)
            return error
    for task_id, reason in refused:  # each alone: the batch goes on
        await run_in_threadpool(lifecycle.fail_task, store, batch, task_id, reason)
    return None


async def _reread(store: lifecycle.Store, batch: BatchRecord) -> BatchRecord:
    stored: BatchRecord | None = await run_in_threadpool(
        store.get_batch, batch.tenant, batch.batch_id
    )
    return stored or batch


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
    batch = await run_in_threadpool(lifecycle.refresh, store, batch, datetime.now(UTC))
    return store, batch


async def batch_status(request: Request) -> Response:
    store, batch = await _batch(request)
    return JSONResponse(await _view(request, store, batch))


async def cancel_batch(request: Request) -> Response:
    store, batch = await _batch(request)
    batch = await run_in_threadpool(lifecycle.cancel, store, batch, datetime.now(UTC))
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


async def sweep_forever(gateway: Gateway) -> None:
    """End the batches left past their window or mid-cancel that nobody reads (every replica
    may run it: ending a task is idempotent)."""
    if not isinstance(gateway.store, BatchStore):
        return
    store = _store(gateway)
    while True:
        await asyncio.sleep(gateway.settings.batch_sweep_s)
        try:
            ended = await run_in_threadpool(lifecycle.sweep, store, datetime.now(UTC))
        except Exception as exc:  # the store is briefly unavailable: the next round retries
            log.warning("batch sweep failed error=%s", exc)
            continue
        if ended:
            log.info("batch sweep ended=%d", ended)


def batch_routes() -> list[Route]:
    return [
        Route("/v1/batches", submit_batch, methods=["POST"]),
        Route("/v1/batches/{batch_id}", batch_status, methods=["GET"], name="batch_status"),
        Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
        Route(
            "/v1/batches/{batch_id}/results", batch_results, methods=["GET"], name="batch_results"
        ),
    ]
