"""A webhook receiver on 127.0.0.1 that checks Conveyor's signatures: for the demo and tests.

It records every delivery (task id, event id, body, whether `X-Conveyor-Signature` verified with
the tenant's secret) and answers 200, or the status a test scripts for a task (to prove retries).
Webhooks are at-least-once: a notify crash between the receiver's answer and the claim's
completion repeats one, with the same `X-Conveyor-Event-Id` and body. `applied()` is what a
receiver that honours that id acts on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True, slots=True)
class Delivery:
    task_id: str
    event_id: str
    body: dict[str, Any]
    signature_ok: bool


class WebhookReceiver:
    def __init__(self, secrets: Mapping[str, str], *, host: str = "127.0.0.1") -> None:
        self.secrets = dict(secrets)
        self.deliveries: list[Delivery] = []
        self.scripted: dict[str, list[int]] = {}  # task id -> statuses to answer, in order
        self._lock = threading.Lock()
        receiver = self

        class _Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                code = receiver._record(
                    raw,
                    self.headers.get("X-Conveyor-Signature", ""),
                    self.headers.get("X-Conveyor-Event-Id", ""),
                )
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer((host, 0), _Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hooks"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _record(self, raw: bytes, signature: str, event_id: str) -> int:
        try:
            body = json.loads(raw)
        except ValueError:
            return 400
        task_id = str(body.get("task_id", ""))
        secret = self.secrets.get(str(body.get("tenant", "")), self.secrets.get("*", ""))
        expected = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        with self._lock:
            script = self.scripted.get(task_id)
            if script:
                return script.pop(0)  # a scripted failure is not a delivery
            self.deliveries.append(
                Delivery(
                    task_id,
                    event_id or str(body.get("event_id", "")),
                    body,
                    hmac.compare_digest(expected, signature),
                )
            )
        return 200

    def snapshot(self) -> list[Delivery]:
        """Every delivery, repeats included, in arrival order."""
        with self._lock:
            return list(self.deliveries)

    def applied(self) -> list[Delivery]:
        """The first delivery of each event id: what an idempotent receiver acts on."""
        first: dict[str, Delivery] = {}
        for delivery in self.snapshot():
            first.setdefault(delivery.event_id, delivery)
        return list(first.values())
