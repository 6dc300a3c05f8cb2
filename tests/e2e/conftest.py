"""Fixtures for end-to-end runs: the result store backends and the webhook receiver."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.local.receiver import WebhookReceiver
from conveyor.store.pgserver import PgServer, PostgresUnavailableError, find_bindir
from conveyor.webhooks import new_secret

# Each tenant signs with its own secret (there is no shared default); the receivers listen on
# 127.0.0.1, which notify's destination policy refuses unless allowlisted.
SECRETS = {tenant: new_secret() for tenant in ("acme", "globex")}
WEBHOOK_ENV = {
    "CONVEYOR_WEBHOOK_SECRETS": json.dumps(SECRETS),
    "CONVEYOR_WEBHOOK_ALLOW": "127.0.0.1/32",
}


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    try:
        server = PgServer(tmp_path_factory.mktemp("pg-e2e"), bindir=find_bindir())
        server.start()
    except PostgresUnavailableError as exc:
        pytest.fail(f"PostgreSQL unavailable for the e2e run: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'conveyor.db'}"
    server: PgServer = request.getfixturevalue("pg_server")
    return server.create_database(f"e2e_{uuid.uuid4().hex[:8]}")


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hooks = WebhookReceiver(SECRETS).start()
    yield hooks
    hooks.stop()
