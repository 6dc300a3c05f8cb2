"""`/metrics` (Prometheus exposition), `/healthz` and `/readyz` for every stage, on an HTTP thread.

`/healthz` (liveness) answers 503 once the loop has stalled longer than `health_stall_s` or
failed, so Kubernetes restarts a stage whose Kafka client broke; `/readyz` (readiness) answers
200 only once the stage is set up (models loaded) and consuming. The bound address is
written to the log and, when `CONVEYOR_PORT_FILE` is set, to that file (tests and the local
supervisor pick free ports with port 0 and read the real one back).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


class HealthServer:
    def __init__(
        self, host: str, port: int, healthy: Callable[[], bool], ready: Callable[[], bool]
    ) -> None:
        checks = {"/healthz": healthy, "/readyz": ready}

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.startswith("/metrics"):
                    self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
                elif self.path in checks:
                    ok = checks[self.path]()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"unavailable\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # scrapes every few seconds would drown the event log

        self.server = ThreadingHTTPServer((host, port), _Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> None:
        self.thread.start()
        log.info("health server listening address=%s", self.address)
        port_file = os.environ.get("CONVEYOR_PORT_FILE")
        if port_file:
            tmp = Path(port_file + ".tmp")
            tmp.write_text(self.address)
            tmp.replace(port_file)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
