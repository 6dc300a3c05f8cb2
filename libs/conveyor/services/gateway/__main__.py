"""Entry point: `python -m conveyor.services.gateway` or `conveyor run gateway` (which calls
`serve()`).

Builds the gateway's resources (result store, one producer for the process, the preprocess lag
probe), serves the ASGI app with uvicorn on `gateway_host:gateway_port`, and, when
`metrics_port` is set (the Helm chart sets it for every service), `/metrics` `/healthz`
`/readyz` on that port too, as the stages do. SIGTERM/SIGINT stop accepting, let requests finish
(WebSockets are closed after `_GRACE_S`), flush the producer and exit 0.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette

from conveyor.admission import Admission, KafkaBacklog
from conveyor.cancel import Canceller
from conveyor.client import TaskClient
from conveyor.events.catalog import INGRESS_TOPIC, LANES, PREPROCESSED_TYPE, load_catalog
from conveyor.kafka.config import common
from conveyor.kafka.lag import CachedLag, GroupLag
from conveyor.paths import restrict_new_files
from conveyor.publisher import AsyncTaskPublisher
from conveyor.quota import QuotaSettings, SqlRateLedger, SubmissionQuota
from conveyor.runtime.health import HealthServer
from conveyor.services.gateway.handler import Gateway, build_app
from conveyor.services.gateway.settings import GatewaySettings
from conveyor.store import open_store
from conveyor.streaming.feed import StreamFeed
from conveyor.streaming.hub import StreamHub
from conveyor.telemetry.logging import setup_logging
from conveyor.telemetry.tracing import init_tracing, shutdown_tracing
from conveyor.web import redact

# Open WebSockets follow tasks for up to an hour; a rolling restart should not wait for them.
_GRACE_S = 10


class _Server(uvicorn.Server):
    """uvicorn, except that a SIGTERM/SIGINT it has drained for is not raised again afterwards.

    uvicorn re-raises the caught signal once shut down, so the process would die by it (exit
    -15); a gateway that drained cleanly exits 0, as the stages do.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach only the main thread; whoever runs us there stops us
            return
        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def build(settings: GatewaySettings) -> tuple[Starlette, Gateway]:
    """The app and its shared state, on real Kafka and the configured store."""
    store = open_store(settings.store_url)
    publisher = AsyncTaskPublisher(
        TaskClient(settings, source="/conveyor/gateway"), ack_timeout_s=settings.publish_timeout_s
    )
    catalog = load_catalog()
    lag = GroupLag(
        settings,
        settings.lag_group,
        [settings.topic(INGRESS_TOPIC)],
        timeout_s=settings.lag_timeout_s,
    )
    backlog = KafkaBacklog(
        common(settings),
        ingress=(settings.lag_group, settings.topic(INGRESS_TOPIC)),
        inference_group=settings.stage_group("inference"),
        lanes={lane: settings.topic(catalog.lane_topic(PREPROCESSED_TYPE, lane)) for lane in LANES},
        timeout_s=settings.lag_timeout_s,
    )
    quota = SubmissionQuota(
        QuotaSettings(),
        SqlRateLedger(settings.store_url.get_secret_value()),
        unfinished=store.count_unfinished,
    )
    canceller = Canceller(settings, store, by="gateway", ack_timeout_s=settings.publish_timeout_s)
    gateway = Gateway(
        settings,
        publisher=publisher,
        store=store,
        queue_estimate=CachedLag(lag.total, ttl_s=settings.lag_cache_s).value,
        closers=(lag.close, quota.close, backlog.close, canceller.close),
        quota=quota,
        admission=Admission(backlog, ttl_s=settings.lag_cache_s),
        **_streaming(settings),
        canceller=canceller,
    )
    return build_app(gateway), gateway


def _streaming(settings: GatewaySettings) -> dict[str, Any]:
    """The stream hub and its feed (docs/streaming.md), unless partial text is not followed."""
    if not settings.stream_follow:
        return {}
    hub = StreamHub(max_tasks=settings.stream_max_tasks, ttl_s=settings.stream_ttl_s)
    return {"streams": hub, "feed": StreamFeed(settings, replay_s=settings.stream_replay_s)}


def uvicorn_config(app: Starlette, settings: GatewaySettings) -> uvicorn.Config:
    # log_config=None keeps Conveyor's log format; uvicorn's access log is off because the app
    # logs each request by route template, without the query string (and the redacting filter
    # masks credentials in any line, should a library or an operator turn more logs on).
    return uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,
        access_log=settings.access_log,
        lifespan="on",
        timeout_graceful_shutdown=_GRACE_S,
    )


def serve() -> int:
    restrict_new_files()  # the SQLite store and anything else it creates: owner only
    setup_logging("gateway")
    settings = GatewaySettings()
    redact.install(token.get_secret_value() for token in settings.gateway_tokens)
    init_tracing("gateway")
    app, gateway = build(settings)
    health = None
    if settings.metrics_port is not None:
        health = HealthServer(
            settings.metrics_host, settings.metrics_port, gateway.healthy, gateway.ready
        )
        health.start()
    server = _Server(uvicorn_config(app, settings))
    try:
        server.run()  # returns after SIGTERM/SIGINT and the lifespan shutdown
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind or start up
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        if health is not None:
            health.stop()
        shutdown_tracing()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(serve())
