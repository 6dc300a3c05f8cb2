"""A webhook receiver on 127.0.0.1 that checks Conveyor's signatures: for the demo and tests.

It records every delivery (task id, webhook id, body, the request headers, and whether the
Standard Webhooks signature verified with the tenant's secret, through
`conveyor.webhooks.verify`, replay window included) and answers 200, or the status a test
scripts for a task (to prove retries). Webhooks are at-least-once: a notify crash between the
receiver's answer and the claim's completion repeats one, with the same `webhook-id` and body.
`applied()` is what a receiver that honours that id acts on. `secrets` maps tenant -> `whsec_`
secret; the key `"*"` stands for any tenant not listed (a receiver's convenience: the sender has
no shared default).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from conveyor.webhooks import ID_HEADER, WebhookVerificationError, verify

# The demo and tests send small summaries; a larger body is refused unread.
MAX_BODY_BYTES = 1_000_000


@dataclass(frozen=True, slots=True)
class Delivery:
    task_id: str
    event_id: str  # the webhook-id: the same on every attempt of one notification
    body: dict[str, Any]
    signature_ok: bool
    headers: Mapping[str, str] = field(default_factory=dict)
    raw: bytes = b""  # the body as received (what a second verifier checks)


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
                if length > MAX_BODY_BYTES:
                    code = 413
                else:
                    raw = self.rfile.read(length)
                    code = receiver._record(raw, {k.lower(): v for k, v in self.headers.items()})
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

    def _record(self, raw: bytes, headers: dict[str, str]) -> int:
        try:
            body = json.loads(raw)
        except ValueError:
            return 400
        if not isinstance(body, dict):
            return 400
        task_id = str(body.get("task_id", ""))
        tenant = str(body.get("tenant", ""))
        secret = self.secrets.get(tenant, self.secrets.get("*"))
        try:
            verified = secret is not None and verify(raw, headers, secret) is not None
        except WebhookVerificationError:
            verified = False
        with self._lock:
            script = self.scripted.get(task_id)
            if script:
                return script.pop(0)  # a scripted failure is not a delivery
            self.deliveries.append(
                Delivery(task_id, headers.get(ID_HEADER, ""), body, verified, headers, raw)
            )
        return 200

    def snapshot(self) -> list[Delivery]:
        """Every delivery, repeats included, in arrival order."""
        with self._lock:
            return list(self.deliveries)

    def applied(self) -> list[Delivery]:
        """The first delivery of each webhook id: what an idempotent receiver acts on."""
        first: dict[str, Delivery] = {}
        for delivery in self.snapshot():
            first.setdefault(delivery.event_id, delivery)
        return list(first.values())
