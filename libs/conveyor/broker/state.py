"""A local broker that outlives the command that started it: `conveyor broker start|stop|status`.

`start_detached` starts a `LocalBroker` in detached mode (no parent-death signal) with its data in
`<state dir>/data` and writes `<state dir>/broker.json` (pid, bootstrap, data dir, log file). The
data directory, and so the ports recorded in its server.properties, persist across stop/start, so
topics and the bootstrap address survive a restart. The state file exists only while a broker runs;
a stale one (the process is gone) reads as stopped. The default state dir is `<home>/var/broker`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conveyor.broker.jars import conveyor_home
from conveyor.broker.jvm import promote_class_archive
from conveyor.broker.local import START_TIMEOUT_S, STOP_TIMEOUT_S, LocalBroker

logger = logging.getLogger(__name__)

STATE_NAME = "broker.json"


@dataclass(frozen=True, slots=True)
class DetachedStatus:
    """What `status_detached` and `start_detached` report."""

    running: bool
    state_dir: Path
    pid: int | None = None
    bootstrap: str | None = None
    data_dir: Path | None = None
    log_file: Path | None = None
    ready_seconds: float | None = None  # of the start that wrote the state file
    already_running: bool = False  # start_detached found a broker running and left it alone

    def describe(self) -> str:
        """One line for people (`conveyor broker status`)."""
        if not self.running:
            return f"kafka broker not running (state dir {self.state_dir})"
        verb = "already running" if self.already_running else "running"
        return f"kafka broker {verb} at {self.bootstrap} pid={self.pid} log={self.log_file}"


@dataclass(frozen=True, slots=True)
class StopResult:
    """What `stop_detached` did."""

    was_running: bool
    pid: int | None = None
    forced: bool = False  # the broker ignored SIGTERM and was killed

    def describe(self) -> str:
        if not self.was_running:
            return "kafka broker was not running"
        return f"kafka broker stopped pid={self.pid}" + (" (killed)" if self.forced else "")


def default_state_dir() -> Path:
    return conveyor_home() / "var" / "broker"


def start_detached(
    state_dir: Path | None = None, *, timeout: float = START_TIMEOUT_S
) -> DetachedStatus:
    """Start a broker in the background, or report the one already running there."""
    state_dir = (state_dir or default_state_dir()).resolve()
    with _locked(state_dir):
        current = status_detached(state_dir)
        if current.running:
            return _replace_already_running(current)
        broker = LocalBroker(state_dir / "data", start_timeout=timeout, detached=True).start()
        state = {
            "pid": broker.pid,
            "bootstrap": broker.bootstrap,
            "data_dir": str(broker.data_dir),
            "log_file": str(broker.log_file),
            "ready_seconds": broker.ready_seconds,
            "class_recording": str(broker.class_recording) if broker.class_recording else None,
            "started_at": time.time(),
        }
        scratch = state_dir / f".{STATE_NAME}.tmp"
        scratch.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        scratch.replace(state_dir / STATE_NAME)  # readers never see a half-written file
    logger.info("kafka broker detached pid=%s bootstrap=%s", broker.pid, broker.bootstrap)
    return status_detached(state_dir)


def status_detached(state_dir: Path | None = None) -> DetachedStatus:
    """Read the state file and check that its process is still the broker it started."""
    state_dir = (state_dir or default_state_dir()).resolve()
    state = _read_state(state_dir)
    if state is None or not _is_broker(int(state["pid"]), Path(state["data_dir"])):
        return DetachedStatus(running=False, state_dir=state_dir)
    return DetachedStatus(
        running=True,
        state_dir=state_dir,
        pid=int(state["pid"]),
        bootstrap=str(state["bootstrap"]),
        data_dir=Path(state["data_dir"]),
        log_file=Path(state["log_file"]),
        ready_seconds=state.get("ready_seconds"),
    )


def stop_detached(state_dir: Path | None = None, *, timeout: float = STOP_TIMEOUT_S) -> StopResult:
    """SIGTERM the detached broker, SIGKILL it after `timeout` s, and remove the state file."""
    state_dir = (state_dir or default_state_dir()).resolve()
    with _locked(state_dir):
        state = _read_state(state_dir)
        (state_dir / STATE_NAME).unlink(missing_ok=True)
        if state is None or not _is_broker(int(state["pid"]), Path(state["data_dir"])):
            return StopResult(was_running=False)
        pid = int(state["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)  # the JVM leads its own process group
        forced = not _wait_exit(pid, timeout)
        if forced:
            logger.warning("kafka broker ignored SIGTERM pid=%d timeout_s=%.0f", pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _wait_exit(pid, 10.0)  # SIGKILL cannot be ignored; 10 s guards a wedged kernel
        recording = state.get("class_recording")
        if recording and not forced:
            promote_class_archive(Path(recording))
    logger.info("kafka broker stopped pid=%d forced=%s", pid, forced)
    return StopResult(was_running=True, pid=pid, forced=forced)


def _replace_already_running(status: DetachedStatus) -> DetachedStatus:
    return DetachedStatus(
        running=True, state_dir=status.state_dir, pid=status.pid, bootstrap=status.bootstrap,
        data_dir=status.data_dir, log_file=status.log_file, ready_seconds=status.ready_seconds,
        already_running=True,
    )  # fmt: skip


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise start/stop on one state dir (two `conveyor broker start` at once)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _read_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and "pid" in state and "data_dir" in state else None


def _is_broker(pid: int, data_dir: Path) -> bool:
    """True if `pid` is alive (not a zombie) and is the Kafka JVM for `data_dir` (no pid reuse)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own exited child
    if not Path("/proc/self").is_dir():  # not Linux: "some process has that pid" must do
        return _pid_alive(pid)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    alive = not _is_zombie(pid)
    return alive and b"kafka.Kafka" in cmdline and str(data_dir).encode() in cmdline


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` s for `pid` to exit; True if it did. Not necessarily our child."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.pidfd_open(pid)  # Linux 5.3+: becomes readable when the process exits
    except (AttributeError, OSError):
        fd = None
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap our own child so it is not left a zombie
            if not _pid_alive(pid) or _is_zombie(pid):
                return True
            if fd is not None:
                select.select([fd], [], [], min(remaining, 0.5))
            else:
                time.sleep(min(remaining, 0.1))  # no pidfd: poll a process we cannot wait on
        return False
    finally:
        if fd is not None:
            os.close(fd)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]
