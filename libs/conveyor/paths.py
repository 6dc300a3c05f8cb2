"""Where Conveyor finds its repository files (schemas, pom) and keeps its caches and state.

The repository root is the directory holding `pyproject.toml`, found by walking up from this
file; `CONVEYOR_HOME` overrides where `var/` (state) and `.cache/` (jars, models) go, and
`CONVEYOR_SCHEMAS_DIR` where the Avro schemas are read from (a container image may move them).
"""

from __future__ import annotations

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
