"""Running a stage as a process: settings, logging, tracing, health server, SIGTERM, exit code.

`run_service(service)` is every service's `main`. SIGTERM and SIGINT stop polling; the batch in
hand is finished, emitted and committed; then the consumer leaves its group and the process
exits 0. A Kafka failure exits 1 so the supervisor (Kubernetes, `conveyor up`) restarts it.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
from typing import Any

from conveyor.errors import BrokerError
from conveyor.paths import restrict_new_files
from conveyor.runtime.handler import StageService
from conveyor.runtime.health import HealthServer
from conveyor.runtime.stage import StageRunner
from conveyor.telemetry.logging import setup_logging
from conveyor.telemetry.tracing import init_tracing, shutdown_tracing

log = logging.getLogger(__name__)


def run_service(service: StageService[Any]) -> int:
    setup_logging(service.name)
    settings = service.settings_type(stage=service.name)
    init_tracing(service.name)
    runner = StageRunner(service, settings)
    health = HealthServer(
        settings.metrics_host, settings.metrics_port, runner.healthy, runner.ready
    )
    health.start()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("stop requested stage=%s signal=%s", service.name, signal.Signals(signum).name)
        runner.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        runner.start()
        # What exists now (modules, models, clients) lives as long as the process: frozen out
        # of the collector's reach, full collections stop re-walking it on every few batches.
        gc.freeze()
        runner.run()
    except BrokerError as exc:
        log.error("kafka failed stage=%s error=%s", service.name, exc)
        code = 1
    except Exception:
        log.exception("stage crashed stage=%s", service.name)
        code = 1
    finally:
        health.stop()
        shutdown_tracing()
    return code


def main(service: StageService[Any]) -> None:
    restrict_new_files()  # what a stage creates (its store, state) is its user's alone
    sys.exit(run_service(service))
