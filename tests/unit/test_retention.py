"""Retention end to end inside one process: writeback stamps the tenant's expiry, the gateway
answers 404 with the reason, the CLI and writeback's background thread sweep (real SQLite)."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse

from conveyor.cli.main import main as cli
from conveyor.retention import RetentionSettings, start_sweeper
from conveyor.services.writeback.handler import WritebackResources
from conveyor.services.writeback.settings import WritebackSettings
from conveyor.store import ResultStore, TaskUpdate, open_store
from tests.stages import write_back
from tests.unit.test_gateway import ACME, client, publisher, store  # noqa: F401  (fixtures)
from tests.unit.test_handlers import ctx, event, task

pytestmark = pytest.mark.timeout(60)


def moderated_at(task_id: str, tenant: str, when: datetime) -> object:
    data = {
        "task": task(task_id, tenant=tenant),
        "model": "m",
        "text": None,
        "embedding": [1.0],
        "label": None,
        "label_scores": {},
        "verdict": "allow",
        "scores": {},
        "reasons": [],
    }
    e = event("conveyor.task.moderated.v1", data, subject=task_id)
    return type(e)(**{**{s: getattr(e, s) for s in e.__slots__}, "time": when.isoformat()})  # type: ignore[attr-defined]


def test_retention_per_tenant_with_a_default() -> None:
    settings = RetentionSettings(retention_s=100, tenant_retention_s={"acme": 10, "keep": 0})
    assert settings.retain_s("acme") == 10
    assert settings.retain_s("globex") == 100
    assert settings.retain_s("keep") is None
    assert RetentionSettings(retention_s=0).retain_s("x") is None


def test_writeback_stamps_each_tenants_expiry() -> None:
    db = open_store("sqlite:///:memory:")
    settings = WritebackSettings(stage="writeback", tenant_retention_s={"acme": 60})
    finished = datetime.now(UTC) - timedelta(seconds=120)
    write_back(
        [moderated_at("a", "acme", finished), moderated_at("g", "globex", finished)],  # type: ignore[list-item]
        ctx(settings, WritebackResources(store=db)),
    )
    assert db.get("a", tenant="acme") is None  # 60 s retention, finished 120 s ago
    assert db.expired_at("a", tenant="acme") == finished + timedelta(seconds=60)
    kept = db.get("g", tenant="globex")  # the 30-day default
    assert kept is not None and kept.expires_at == finished + timedelta(days=30)


def expired(db: ResultStore, task_id: str) -> datetime:
    when = datetime.now(UTC) - timedelta(seconds=100)
    db.apply(
        TaskUpdate(
            task_id,
            f"{task_id}-done",
            "x",
            "completed",
            when,
            tenant="acme",
            retain_s=50,
            result={"text": "private"},
        )
    )
    return when + timedelta(seconds=50)


def test_gateway_answers_404_with_the_reason_for_an_expired_task(
    client: TestClient,  # noqa: F811
    store: ResultStore,  # noqa: F811
) -> None:
    at = expired(store, "old")
    answer = client.get("/v1/tasks/old", headers=ACME)
    assert answer.status_code == 404
    body = answer.json()
    assert body["reason"] == "expired" and body["expired_at"] == at.isoformat()
    assert "retention" in body["error"] and "private" not in answer.text
    assert client.get("/v1/tasks/never", headers=ACME).json() == {"error": "task not found"}
    with pytest.raises(WebSocketDenialResponse) as denied:
        client.websocket_connect("/v1/tasks/old/events", headers=ACME).__enter__()
    assert denied.value.status_code == 404
    again = client.post(
        "/v1/tasks", headers=ACME, json={"task_id": "old", "kind": "embed", "input": "x"}
    )
    assert again.status_code == 409 and "expired" in again.json()["error"]


def test_live_task_view_says_when_it_expires(
    client: TestClient,  # noqa: F811
    store: ResultStore,  # noqa: F811
) -> None:
    when = datetime.now(UTC)
    store.apply(TaskUpdate("t", "t-done", "x", "completed", when, tenant="acme", retain_s=3600))
    view = client.get("/v1/tasks/t", headers=ACME).json()
    assert view["expires_at"] == (when + timedelta(seconds=3600)).isoformat()


def test_cli_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    db = open_store(url)
    expired(db, "old")
    db.close()
    monkeypatch.setenv("CONVEYOR_STORE_URL", url)
    monkeypatch.setenv("CONVEYOR_RETENTION_TOMBSTONE_S", "1")
    assert cli(["retention", "sweep", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "events": 1,
        "purged": 1,
        "deleted": 1,
        "reuse": 0,
    }
    assert cli(["status", "old"]) == 1  # the tombstone went too: plain not found


def test_writebacks_background_sweeper_purges(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = open_store(f"sqlite:///{path}")
    expired(db, "old")
    db.close()
    settings = RetentionSettings(store_url=f"sqlite:///{path}", retention_sweep_s=0.05)  # type: ignore[arg-type]
    sweeper = start_sweeper(settings)
    assert sweeper is not None
    try:
        deadline = time.monotonic() + 20
        while _events(path):
            assert time.monotonic() < deadline, "the sweeper never purged the expired task"
            time.sleep(0.05)
    finally:
        sweeper.stop()
    assert sweeper.sweeps >= 1
    assert start_sweeper(RetentionSettings(retention_sweep_s=0)) is None


def _events(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM task_events").fetchone()[0])
