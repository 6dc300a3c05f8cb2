"""A real single-node Apache Kafka broker (KRaft, combined broker + controller) run with local Java.

`LocalBroker` picks free ports on 127.0.0.1, writes `server.properties` and a log4j2 config into a
data directory, formats the storage once (`kafka.tools.StorageTool format --standalone`), starts
`kafka.Kafka` in its own process group and returns only when a client request round-trips. It can
be stopped, killed and restarted on the same ports and data (for chaos tests). Unless `detached`,
the JVM gets SIGTERM when the Python thread that started it dies (Linux `PR_SET_PDEATHSIG`), so a
crashed test session leaves no broker behind; start it from a long-lived thread.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from conveyor.broker.config import (
    DEFAULT_MESSAGE_MAX_BYTES,
    BrokerConfig,
    new_cluster_id,
    ports_from_properties,
    write_config_files,
)
from conveyor.broker.jars import ensure_jars
from conveyor.broker.jvm import (
    BROKER_JVM,
    FORMAT_JVM,
    class_archive,
    class_archive_flags,
    die_with_parent_hook,
    java_command,
    promote_class_archive,
    signal_group,
)
from conveyor.broker.probe import answers, probe_client
from conveyor.net import free_ports

logger = logging.getLogger(__name__)

# Format + JVM start + first request took 3.5-9 s on a busy 2-core VM; 60 s covers a loaded CI box.
START_TIMEOUT_S = 60.0
FORMAT_TIMEOUT_S = 60.0
# A graceful KRaft shutdown of one node takes 1-3 s; past 30 s the JVM is stuck and is killed.
STOP_TIMEOUT_S = 30.0
KILL_WAIT_S = 10.0  # SIGKILL cannot be ignored; 10 s only guards against a wedged kernel
PROBE_TIMEOUT_S = 1.0  # one readiness request; retried until the start deadline
BIND_RETRIES = 3  # fresh ports picked when another process took ours before the JVM bound them
STDOUT_NAME = "broker.out"


class BrokerStartError(RuntimeError):
    """The broker process died or did not answer before its deadline."""


class LocalBroker:
    """One Kafka process; `bootstrap` stays the same across restarts."""

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        broker_port: int | None = None,
        controller_port: int | None = None,
        message_max_bytes: int = DEFAULT_MESSAGE_MAX_BYTES,
        start_timeout: float = START_TIMEOUT_S,
        detached: bool = False,
    ) -> None:
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="conveyor-kafka-")).resolve()
        self._fixed_ports = broker_port is not None and controller_port is not None
        if not self._fixed_ports:
            broker_port, controller_port = self._existing_ports() or free_ports(2)
        assert broker_port is not None and controller_port is not None
        self.config = BrokerConfig(
            self.data_dir, broker_port, controller_port, message_max_bytes=message_max_bytes
        )
        self._start_timeout = start_timeout
        self._detached = detached
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offsets: dict[Path, int] = {}  # log sizes at the last spawn: read from there
        self.class_recording: Path | None = None  # AppCDS archive this JVM writes at a clean exit
        self.ready_seconds: float | None = None  # last start/restart: spawn (+format) to ready

    @property
    def bootstrap(self) -> str:
        return self.config.bootstrap

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_file(self) -> Path:
        return self.config.log_file

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalBroker:
        """Format (first time only), start and wait until the broker answers."""
        if self.is_running():
            return self
        libs = ensure_jars()
        for attempt in range(1, BIND_RETRIES + 1):
            started = time.monotonic()
            formatted = self._format_once(libs)
            self._spawn(libs)
            try:
                self._wait_ready(started)
            except BrokerStartError:
                if not self._retry_with_new_ports(formatted, attempt):
                    raise
                continue
            self._log_ready(started, formatted=formatted)
            return self
        raise AssertionError("unreachable")  # the loop returns or raises

    def stop(self, *, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (a clean KRaft shutdown), then SIGKILL after `timeout` seconds."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            self._settle_class_recording(clean=False)  # it exited on its own: keep no archive
            return
        began = time.monotonic()
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("kafka broker ignored SIGTERM pid=%d timeout_s=%.0f", proc.pid, timeout)
            signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=KILL_WAIT_S)
        self._settle_class_recording(clean=proc.returncode in (0, 143))  # 143: exit after SIGTERM
        logger.info("kafka broker stopped pid=%d seconds=%.2f", proc.pid, time.monotonic() - began)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no clean shutdown, data already written stays on disk."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=KILL_WAIT_S)
            logger.info("kafka broker killed pid=%d", proc.pid)
        self._settle_class_recording(clean=False)

    def restart(self, *, hard: bool = False) -> None:
        """Stop (or kill when `hard`) and start again on the same ports and data directory."""
        if hard:
            self.kill()
        else:
            self.stop()
        started = time.monotonic()
        self._spawn(ensure_jars())
        self._wait_ready(started)
        self._log_ready(started, formatted=False)

    def close(self) -> None:
        """Stop the broker; remove the data directory if this object created it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        """Since the last spawn: the first ERROR lines (the cause), then the last `lines` lines of
        the broker log and of its stdout/stderr (where the JVM's own errors land)."""
        parts = []
        for path in (self.config.log_file, self.data_dir / STDOUT_NAME):
            text = _read_from(path, self._log_offsets.get(path, 0)).splitlines()
            if text:
                parts.append(f"--- {path} ---\n" + "\n".join([*_errors(text), *text[-lines:]]))
        return "\n".join(parts) or "(no broker output)"

    def _existing_ports(self) -> tuple[int, int] | None:
        props = self.data_dir / "server.properties"
        return ports_from_properties(props.read_text(encoding="utf-8")) if props.is_file() else None

    def _is_formatted(self) -> bool:
        return (self.config.log_dir / "meta.properties").is_file()

    def _java(self, libs: Path, jvm: list[str], *args: str, record: bool = False) -> list[str]:
        cds, recording = class_archive_flags(class_archive(libs), record=record)
        if record:
            self.class_recording = recording
        return java_command(libs, jvm, self.config.log4j_path, *args, cds=cds)

    def _settle_class_recording(self, *, clean: bool) -> None:
        """Keep the class archive a cleanly exited JVM wrote; a killed JVM wrote none."""
        recording, self.class_recording = self.class_recording, None
        if recording is not None and clean:
            promote_class_archive(recording)
        elif recording is not None:
            recording.unlink(missing_ok=True)

    def _format_once(self, libs: Path) -> bool:
        """Write the configs; format the storage unless already formatted. True if it formatted."""
        write_config_files(self.config)
        if self._is_formatted():
            return False
        cmd = self._java(
            libs, FORMAT_JVM, "kafka.tools.StorageTool", "format", "-t", new_cluster_id(),
            "-c", str(self.config.server_properties_path), "--standalone",
        )  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=FORMAT_TIMEOUT_S)
        if done.returncode != 0:
            raise BrokerStartError(f"kafka storage format failed rc={done.returncode}\n"
                                   f"{done.stdout}{done.stderr}\n{self.log_tail()}")  # fmt: skip
        return True

    def _spawn(self, libs: Path) -> None:
        self._log_offsets = {
            path: path.stat().st_size if path.is_file() else 0
            for path in (self.config.log_file, self.data_dir / STDOUT_NAME)
        }
        props = str(self.config.server_properties_path)
        cmd = self._java(libs, BROKER_JVM, "kafka.Kafka", props, record=True)
        with open(self.data_dir / STDOUT_NAME, "ab") as out:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(
                cmd, cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,  # own group: signals hit only it
                preexec_fn=None if self._detached else die_with_parent_hook(),
            )  # fmt: skip

    def _wait_ready(self, started: float) -> None:
        """Return once a metadata request succeeds; raise with the log tail on death or timeout."""
        assert self._proc is not None
        deadline = started + self._start_timeout
        admin = probe_client(self.bootstrap)
        while (remaining := deadline - time.monotonic()) > 0:
            if self._proc.poll() is not None:
                raise BrokerStartError(
                    f"kafka broker exited rc={self._proc.returncode} bootstrap={self.bootstrap}\n"
                    f"{self.log_tail()}"
                )
            if answers(admin, timeout=min(PROBE_TIMEOUT_S, remaining)):
                return
            with contextlib.suppress(subprocess.TimeoutExpired):  # a pause that ends if JVM dies
                self._proc.wait(timeout=min(0.05, max(remaining, 0.001)))
        self.kill()
        raise BrokerStartError(
            f"kafka broker not ready after {self._start_timeout:.0f}s bootstrap={self.bootstrap}\n"
            f"{self.log_tail()}"
        )

    def _retry_with_new_ports(self, formatted: bool, attempt: int) -> bool:
        """After a bind failure on ports we picked ourselves, pick others and format afresh."""
        if self._fixed_ports or not formatted or attempt >= BIND_RETRIES:
            return False
        if "Address already in use" not in self.log_tail(lines=200):
            return False
        self.kill()
        old = self.bootstrap
        shutil.rmtree(self.config.log_dir, ignore_errors=True)  # bound to the old controller port
        broker_port, controller_port = free_ports(2)
        self.config = BrokerConfig(
            self.data_dir, broker_port, controller_port,
            message_max_bytes=self.config.message_max_bytes,
        )  # fmt: skip
        logger.warning("kafka port taken, retrying old=%s new=%s", old, self.bootstrap)
        return True

    def _log_ready(self, started: float, *, formatted: bool) -> None:
        self.ready_seconds = time.monotonic() - started
        logger.info(
            "kafka broker ready bootstrap=%s seconds=%.2f formatted=%s pid=%s data_dir=%s",
            self.bootstrap, self.ready_seconds, formatted, self.pid, self.data_dir,
        )  # fmt: skip


def _read_from(path: Path, offset: int) -> str:
    """The file's text from `offset` (from the start if it rolled over and shrank meanwhile)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset if offset <= path.stat().st_size else 0)
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _errors(lines: list[str], limit: int = 4) -> list[str]:
    """The first `limit` ERROR/FATAL log lines with the exception line that follows each."""
    found: list[str] = []
    for i, line in enumerate(lines):
        if len(found) >= 2 * limit:
            break
        if "] ERROR " in line or "] FATAL " in line:
            found += [line, *lines[i + 1 : i + 2], "..."]
    return found
