"""The whole pipeline on one machine: broker, topics, every service as its own process.

`conveyor up` and the end-to-end tests both use `LocalStack`, so the demo runs exactly what the
tests prove. Services start downstream first (writeback ... preprocess), so nothing they emit
waits on a consumer that is not there yet. A service that dies is restarted by `supervise()`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conveyor.local.process import SERVICES, ServiceProcess
from conveyor.settings import KafkaSettings
from conveyor.topology import apply_topics

log = logging.getLogger(__name__)
# Inference loads its models before it reports healthy: allow for a cold cache on 2 cores.
READY_TIMEOUT_S = 300.0


class LocalStack:
    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str],
        *,
        services: tuple[str, ...] = SERVICES,
        per_service: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.workdir = workdir
        self.env = dict(env)
        self.procs = {
            name: ServiceProcess(name, {**self.env, **(per_service or {}).get(name, {})}, workdir)
            for name in services
        }
        self.restarts = 0

    def apply_topics(self, **kwargs: Any) -> list[str]:
        settings = KafkaSettings(
            kafka_bootstrap=self.env["CONVEYOR_KAFKA_BOOTSTRAP"],
            topic_prefix=self.env.get("CONVEYOR_TOPIC_PREFIX", ""),
        )
        return apply_topics(settings, **kwargs)

    def start(self, *, timeout_s: float = READY_TIMEOUT_S) -> None:
        for name in reversed(list(self.procs)):
            self.procs[name].start()
        for name in reversed(list(self.procs)):
            self.procs[name].wait_ready(timeout_s)
            log.info("service ready name=%s address=%s", name, self.procs[name].address)

    def supervise(self) -> list[str]:
        """Restart services that exited; returns the names restarted."""
        restarted = []
        for name, proc in self.procs.items():
            if proc.proc is not None and not proc.running():
                log.warning(
                    "service exited name=%s code=%s; restarting", name, proc.proc.returncode
                )
                proc.start()
                restarted.append(name)
                self.restarts += 1
        return restarted

    def stop(self) -> None:
        # Upstream first, so downstream stages drain what upstream emitted while stopping.
        for proc in self.procs.values():
            proc.stop()

    def wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.supervise()
            time.sleep(0.5)
