"""The JVM side of the local broker: command lines, the class-data archive, process signals.

Start time of the broker is mostly JVM class loading (46 jars, ~5,000 classes), so we keep an
AppCDS archive per (Java build, jar set) under `<home>/.cache/kafka/cds`: the first cleanly stopped
broker records the classes it loaded (`-XX:ArchiveClassesAtExit`, written at JVM exit), and later
JVMs (the broker and the format tool) map it instead, which roughly halved JVM start here. A stale
or corrupt archive only turns sharing off (the JVM then loads classes normally), and
`CONVEYOR_KAFKA_CDS=0` disables it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conveyor.broker.jars import conveyor_home, java_executable

logger = logging.getLogger(__name__)

# Small fixed heap and the serial collector: a test broker holds little data, and SerialGC starts
# fastest and uses the least memory on small machines. Exit on OOM so a dying JVM shows at once.
BROKER_JVM = ["-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:+ExitOnOutOfMemoryError"]
# The format tool runs for a second or two: C1-only JIT starts faster, and it needs little heap.
FORMAT_JVM = ["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"]
COMMON_JVM = ["-Djava.awt.headless=true", "-XX:-UsePerfData"]  # no /tmp/hsperfdata files
# Unpromoted recordings (a broker that died before a clean exit) older than this are deleted.
STALE_RECORDING_S = 3600.0
_PR_SET_PDEATHSIG = 1


def java_command(
    libs: Path, jvm: list[str], log4j_config: Path, main: str, *args: str, cds: list[str]
) -> list[str]:
    """`java <jvm flags> -cp <libs>/* <main> <args>`; Java expands the `*` itself (no shell)."""
    log4j = f"-Dlog4j2.configurationFile={log4j_config}"
    return [java_executable(), *jvm, *COMMON_JVM, *cds, log4j, "-cp", f"{libs}/*", main, *args]


def class_archive(libs: Path) -> Path | None:
    """The AppCDS archive path for this Java build and jar set (it may not exist yet), or None."""
    if os.environ.get("CONVEYOR_KAFKA_CDS", "1") == "0":
        return None
    java = Path(java_executable()).resolve()
    release = java.parent.parent / "release"  # the JDK build identity; changes with every update
    build = release.read_text(errors="replace") if release.is_file() else str(java.stat().st_mtime)
    jars = "\n".join(sorted(path.name for path in libs.glob("*.jar")))
    key = hashlib.sha256(f"{java}\n{build}\n{libs}\n{jars}".encode()).hexdigest()[:16]
    return conveyor_home() / ".cache" / "kafka" / "cds" / f"kafka-{key}.jsa"


def class_archive_flags(archive: Path | None, *, record: bool) -> tuple[list[str], Path | None]:
    """JVM flags that use `archive`, or record it at exit when it is missing and `record` is set.

    Returns the flags and the scratch file being recorded (hand it to `promote_class_archive` once
    the JVM has exited cleanly), or None when nothing is recorded.
    """
    quiet = "-Xlog:cds=off"  # "class not supported by CDS" warnings are expected and harmless
    if archive is None:
        return [], None
    if archive.is_file():
        return [f"-XX:SharedArchiveFile={archive}", quiet], None
    if not record:
        return [], None
    archive.parent.mkdir(parents=True, exist_ok=True)
    _drop_stale_recordings(archive.parent)
    scratch = archive.with_name(f"{archive.name}.{os.getpid()}-{time.monotonic_ns()}.tmp")
    return [f"-XX:ArchiveClassesAtExit={scratch}", quiet], scratch


def promote_class_archive(scratch: Path) -> None:
    """Move a recorded archive into place (an atomic rename), or drop an empty or missing one."""
    archive = scratch.with_name(scratch.name.split(".jsa.", 1)[0] + ".jsa")
    if scratch.is_file() and scratch.stat().st_size > 0:
        scratch.replace(archive)
        logger.info("kafka class archive recorded path=%s", archive)
    else:
        scratch.unlink(missing_ok=True)


def _drop_stale_recordings(folder: Path) -> None:
    cutoff = time.time() - STALE_RECORDING_S
    for path in folder.glob("*.tmp"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:  # another process promoted or removed it meanwhile
            pass


def die_with_parent_hook() -> Callable[[], object] | None:
    """A preexec_fn asking Linux to SIGTERM the child when its parent thread dies, or None."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, only called after
    return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group the JVM leads (it was started with start_new_session)."""
    with contextlib.suppress(ProcessLookupError):  # it already exited
        os.killpg(proc.pid, sig)
