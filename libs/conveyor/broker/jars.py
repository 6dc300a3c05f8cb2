"""Locating Java and the Apache Kafka server jars for the local broker.

The jars are resolved from Maven Central by `pom.xml` beside this module, copied by Maven into a
git-ignored cache `<home>/.cache/kafka/<kafka version>/libs`, where `<home>` is
`conveyor.paths.home()` (`CONVEYOR_HOME`, else the repository root) and `CONVEYOR_KAFKA_LIBS`
overrides the whole folder. A marker file, written last, records which pom filled the cache: while
it matches, Maven is not run again. A file lock serialises concurrent resolutions (two test sessions
starting at once), and Maven copies into a scratch folder that is renamed into place, so a
half-filled cache is never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from conveyor import paths

logger = logging.getLogger(__name__)

POM_PATH = Path(__file__).with_name("pom.xml")
MARKER_NAME = ".conveyor-complete"
# Maven downloads ~44 MB on a cold cache (~15 s measured); 10 minutes covers a slow mirror.
MAVEN_TIMEOUT_S = 600.0
_POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}


class BrokerSetupError(RuntimeError):
    """Java, Maven or the Kafka jars are missing or could not be resolved."""


def conveyor_home() -> Path:
    """Where `var/` and `.cache/` live: `CONVEYOR_HOME`, else the repository root."""
    return paths.home().resolve()


def kafka_version(pom: Path = POM_PATH) -> str:
    """The Kafka version the pom pins (its `kafka.version` property)."""
    node = ET.parse(pom).getroot().find("m:properties/m:kafka.version", _POM_NS)
    if node is None or not (node.text or "").strip():
        raise BrokerSetupError(f"{pom} has no <kafka.version> property")
    return (node.text or "").strip()


def libs_dir() -> Path:
    """The folder that holds (or will hold) the Kafka jars."""
    override = os.environ.get("CONVEYOR_KAFKA_LIBS")
    if override:
        return Path(override).expanduser().resolve()
    return conveyor_home() / ".cache" / "kafka" / kafka_version() / "libs"


def java_executable() -> str:
    """`$JAVA_HOME/bin/java` when set, else `java` on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise BrokerSetupError(
            "java not found: the local Kafka broker needs a Java 17+ runtime "
            "(e.g. `apt-get install openjdk-17-jre-headless`) or JAVA_HOME"
        )
    return found


def _pom_digest(pom: Path) -> str:
    return hashlib.sha256(pom.read_bytes()).hexdigest()


def _is_complete(folder: Path, digest: str) -> bool:
    marker = folder / MARKER_NAME
    return marker.is_file() and marker.read_text(encoding="utf-8").split()[:1] == [digest]


def _is_foreign_kafka_libs(folder: Path) -> bool:
    """A user-supplied libs folder (e.g. a Kafka distribution's `libs/`) without our marker."""
    return bool(os.environ.get("CONVEYOR_KAFKA_LIBS")) and any(folder.glob("kafka_2.13-*.jar"))


def ensure_jars(*, pom: Path = POM_PATH) -> Path:
    """Return the jars folder, running Maven first unless a completed cache is there."""
    target = libs_dir()
    digest = _pom_digest(pom)
    if _is_complete(target, digest):
        return target
    if _is_foreign_kafka_libs(target):
        logger.info("kafka jars used as given path=%s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not _is_complete(target, digest):  # another process may have finished meanwhile
            _resolve(pom, target, digest)
    return target


def _resolve(pom: Path, target: Path, digest: str) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerSetupError(
            "mvn not found: it resolves the Kafka jars from Maven Central once "
            f"(e.g. `apt-get install maven`), or set CONVEYOR_KAFKA_LIBS to a folder of Kafka jars "
            f"(pom: {pom})"
        )
    java_executable()  # fail early and clearly: Maven without Java gives a confusing error
    scratch = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    cmd = [
        mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
        "-DincludeScope=runtime", f"-DoutputDirectory={scratch}",
    ]  # fmt: skip
    logger.info("resolving kafka jars pom=%s target=%s", pom, target)
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=MAVEN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise BrokerSetupError(f"mvn timed out after {MAVEN_TIMEOUT_S:.0f}s: {cmd}") from exc
    jars = sorted(scratch.glob("*.jar"))
    if done.returncode != 0 or not jars:
        shutil.rmtree(scratch, ignore_errors=True)
        tail = (done.stdout + done.stderr)[-4000:]
        raise BrokerSetupError(f"mvn failed rc={done.returncode} cmd={cmd}\n{tail}")
    (scratch / MARKER_NAME).write_text(f"{digest} {len(jars)} jars\n", encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)  # a stale or incomplete earlier cache
    scratch.rename(target)
    logger.info(
        "kafka jars resolved jars=%d seconds=%.1f target=%s",
        len(jars), time.monotonic() - started, target,
    )  # fmt: skip
