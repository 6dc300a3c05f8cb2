"""The chart's `helm test` script (deploy/k8s/conveyor/files/helm-test.py) decides right.

It runs here against a real HTTP server standing in for the gateway and a stand-in `conveyor`
command on PATH (the real ones need a whole pipeline, which the e2e suite covers): it submits with
the first token's tenant, polls with that token, passes only on `completed`, fails on any other
final status or at its deadline, and polls `conveyor status` when there is no gateway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.deploysupport import CHART

SCRIPT = CHART / "files" / "helm-test.py"
RUN_TIMEOUT_S = 60

FAKE_CONVEYOR = """#!/bin/sh
echo "$@" >> "$FAKE_LOG"
case "$1" in
  submit) printf 'task-7\\ttrace=-\\n' ;;
  status) echo '{"status": "completed"}' ;;
esac
"""


class _Gateway(BaseHTTPRequestHandler):
    statuses: list[str] = []
    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append((self.path, self.headers.get("Authorization", "")))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status == "404":
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps({"task_id": "task-7", "status": status}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[tuple[str, type[_Gateway]]]:
    handler = type("Gateway", (_Gateway,), {"statuses": [], "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "conveyor"
    fake.write_text(FAKE_CONVEYOR)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    full_env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "CONVEYOR_TEST_KIND": "embed",
        "CONVEYOR_TEST_INPUT": "hello",
        "CONVEYOR_TEST_TIMEOUT_S": "20",
        "CONVEYOR_TEST_POLL_S": "0.05",
        **env,
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


def _gateway_env(url: str) -> dict[str, str]:
    return {
        "CONVEYOR_TEST_GATEWAY_URL": url,
        "CONVEYOR_TEST_GATEWAY_TOKENS": json.dumps({"tok-1": "acme", "tok-2": "globex"}),
    }


def test_passes_once_the_task_completes_polling_with_the_tenants_token(
    tmp_path: Path, gateway: tuple[str, type[_Gateway]]
) -> None:
    url, handler = gateway
    handler.statuses[:] = ["404", "pending", "processing", "completed"]
    proc, calls = _run(tmp_path, **_gateway_env(url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls == ["submit --kind embed --input hello --tenant acme"]
    assert set(handler.seen) == {("/v1/tasks/task-7", "Bearer tok-1")}
    assert len(handler.seen) >= 4
    assert "task-7: completed" in proc.stdout


@pytest.mark.parametrize("final", ["failed", "blocked", "expired"])
def test_fails_on_any_other_final_status(
    tmp_path: Path, gateway: tuple[str, type[_Gateway]], final: str
) -> None:
    url, handler = gateway
    handler.statuses[:] = ["processing", final]
    proc, _ = _run(tmp_path, **_gateway_env(url))
    assert proc.returncode == 1
    assert f"task-7: {final}" in proc.stdout


def test_fails_at_its_deadline_when_the_task_never_finishes(
    tmp_path: Path, gateway: tuple[str, type[_Gateway]]
) -> None:
    url, handler = gateway
    handler.statuses[:] = ["processing"]
    proc, _ = _run(tmp_path, CONVEYOR_TEST_TIMEOUT_S="1", **_gateway_env(url))
    assert proc.returncode == 1
    assert "not completed in time (last status processing)" in proc.stderr


def test_fails_without_a_gateway_token(tmp_path: Path) -> None:
    proc, calls = _run(
        tmp_path, CONVEYOR_TEST_GATEWAY_URL="http://127.0.0.1:9", CONVEYOR_TEST_GATEWAY_TOKENS="{}"
    )
    assert proc.returncode == 1
    assert "no gateway token" in proc.stderr
    assert calls == [], "nothing submitted"


def test_without_a_gateway_it_polls_the_store(tmp_path: Path) -> None:
    proc, calls = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        "submit --kind embed --input hello --tenant helm-test",
        "status task-7 --tenant helm-test --json",
    ]
