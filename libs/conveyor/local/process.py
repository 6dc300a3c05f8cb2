"""One stage service as its own OS process: start, wait until healthy, stop, kill, restart.

Used by `conveyor up` and by the end-to-end tests, so both run services exactly the same way:
`python -m conveyor.services.<name>` with the environment given, `/metrics` + `/healthz` on a
free port on 127.0.0.1 (the port is read back from `CONVEYOR_PORT_FILE`), output to a log file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from conveyor.paths import private_dir, private_file

SERVICES = ("preprocess", "inference", "moderation", "writeback", "notify")


class ServiceProcess:
    def __init__(self, name: str, env: Mapping[str, str], workdir: Path, *, index: int = 0) -> None:
        self.name = name
        self.label = name if index == 0 else f"{name}-{index}"
        self.workdir = workdir
        self.env = dict(env)
        self.port_file = workdir / f"{self.label}.port"
        self.log_path = workdir / f"{self.label}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address: str | None = None
        self.starts = 0

    def start(self) -> None:
        private_dir(self.workdir)
        self.port_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            **self.env,
            "CONVEYOR_PORT_FILE": str(self.port_file),
            "CONVEYOR_INSTANCE_ID": f"{self.label}-{self.starts}",
            "CONVEYOR_INSTANCE_SLOT": self.label,
        }  # stable across restarts (transactions)
        env.setdefault("CONVEYOR_METRICS_PORT", "0")
        log = private_file(self.log_path).open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"conveyor.services.{self.name}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.starts += 1
        self.address = None

    def wait_ready(self, timeout_s: float = 120.0) -> str:
        """Wait for the port file and a 200 from /readyz; raise with the log tail otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited {self.proc.returncode}:\n{self.tail()}")
            if self.port_file.exists():
                self.address = self.port_file.read_text().strip()
                if self.probe("/readyz"):
                    return self.address
            time.sleep(0.1)
        raise TimeoutError(f"{self.label} not ready after {timeout_s}s:\n{self.tail()}")

    def healthy(self) -> bool:
        return self.probe("/healthz")

    def probe(self, path: str) -> bool:
        if not self.address:
            return False
        try:
            with urllib.request.urlopen(f"http://{self.address}{path}", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.address}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL after `timeout_s`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9: no drain, no commit, as a crash or an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
