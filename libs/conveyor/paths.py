"""Where Conveyor finds its repository files (schemas, pom) and keeps its caches and state.

The repository root is the directory holding `pyproject.toml`, found by walking up from this
file; `CONVEYOR_HOME` overrides where `var/` (state) and `.cache/` (jars, models) go, and
`CONVEYOR_SCHEMAS_DIR` where the Avro schemas are read from (a container image may move them).
"""

from __future__ import annotations

import contextlib
import os
from functools import cache
from pathlib import Path


@cache
def repo_root() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "schemas").is_dir():
            return parent
    return Path.cwd()


def home() -> Path:
    return Path(os.environ.get("CONVEYOR_HOME") or repo_root())


def schemas_dir() -> Path:
    return Path(os.environ.get("CONVEYOR_SCHEMAS_DIR") or repo_root() / "schemas")


def cache_dir() -> Path:
    return home() / ".cache"


def var_dir() -> Path:
    return home() / "var"


# Results, logs and broker state may hold tenants' data: only Conveyor's own user reads them.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def restrict_new_files() -> None:
    """Every file and folder this process (and its children, the broker's JVM included) creates
    from now on is private to its user: 0600 files in 0700 folders, as a daemon's umask 077."""
    os.umask(0o077)


def private_dir(path: Path) -> Path:
    """`path` as a folder only its owner may enter (created if missing, tightened if not)."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    path.chmod(PRIVATE_DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """`path` as a file only its owner may read: created empty with mode 0600 if missing, in a
    folder created private; an existing file keeps its content and is tightened to 0600.

    An existing file is never opened: closing any descriptor of a file drops every POSIX lock
    this process holds on it, and SQLite's locks are POSIX locks. A second store opened on a
    database file this process already has open (writeback's retention sweeper, the gateway's
    quota ledger) would otherwise strip the first connection's locks, and another process's
    close could then take itself for the last connection and delete the write-ahead log that
    connection still writes to: committed writes lost."""
    if not path.parent.exists():
        private_dir(path.parent)
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # created meanwhile: then it exists
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    path.chmod(PRIVATE_FILE_MODE)
    return path
