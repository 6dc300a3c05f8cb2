"""HTTP receivers on 127.0.0.1 that misbehave on purpose, for the webhook tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Behaviour = Callable[[BaseHTTPRequestHandler], None]


class Server:
    """A receiver on 127.0.0.1 whose answer is `behaviour`; counts requests and bytes sent."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.requests: list[dict[str, str]] = []
        self.sent = 0
        self.open = 0  # requests being answered right now
        self.done = 0  # requests answered (or abandoned by the sender)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with server.lock:
                    server.requests.append({k.lower(): v for k, v in self.headers.items()})
                    server.open += 1
                try:
                    behaviour(self)
                except OSError:
                    pass  # the sender hung up: what a bounded sender does
                finally:
                    with server.lock:
                        server.open -= 1
                        server.done += 1

            def log_message(self, format: str, *args: object) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks?token=abc"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def ok(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(204)
    handler.send_header("Content-Length", "0")
    handler.end_headers()
