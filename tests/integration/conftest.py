"""Session fixtures for integration tests that need real services.

`postgres_url`: a PostgreSQL database for the whole session. `CONVEYOR_POSTGRES_URL` points at an
existing server (CI service container); otherwise a throwaway server is started from the machine's
PostgreSQL binaries by `conveyor.store.pgserver`. Missing binaries or a server that will not start
FAIL the tests (CI must not go green without PostgreSQL), unless `CONVEYOR_SKIP_POSTGRES=1`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from conveyor.store.pgserver import PgServer, PostgresUnavailableError, find_bindir

_SKIP_HINT = "set CONVEYOR_SKIP_POSTGRES=1 to skip the PostgreSQL tests deliberately"


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL database (`conveyor_test`) shared by the session's tests."""
    if url := os.environ.get("CONVEYOR_POSTGRES_URL"):
        yield url
        return
    if os.environ.get("CONVEYOR_SKIP_POSTGRES") == "1":
        pytest.skip("CONVEYOR_SKIP_POSTGRES=1")
    try:
        server = PgServer(tmp_path_factory.mktemp("postgres"), bindir=find_bindir())
        server.start()
    except PostgresUnavailableError as exc:
        pytest.fail(f"PostgreSQL unavailable: {exc}\n({_SKIP_HINT})", pytrace=False)
    try:
        yield server.create_database("conveyor_test")
    finally:
        server.stop()
