"""`conveyor trace`: the stored trace id and its Jaeger link, or a clear failure."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from conveyor.cli.main import main
from conveyor.store import TaskUpdate, open_store

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    monkeypatch.setenv("CONVEYOR_STORE_URL", url)
    store = open_store(url)
    now = datetime.now(UTC)
    store.apply(
        TaskUpdate(
            "t-traced",
            "e-1",
            "conveyor.task.preprocessed.v1",
            "processing",
            now,
            tenant="acme",
            trace_id=TRACE,
        )
    )
    store.apply(
        TaskUpdate(
            "t-untraced", "e-2", "conveyor.task.preprocessed.v1", "processing", now, tenant="acme"
        )
    )
    store.close()
    return url


def test_trace_prints_trace_id_and_default_jaeger_link(
    store_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CONVEYOR_JAEGER_URL", raising=False)
    assert main(["trace", "t-traced"]) == 0
    out = capsys.readouterr().out
    assert f"trace_id  {TRACE}" in out
    assert f"http://127.0.0.1:16686/trace/{TRACE}" in out


def test_trace_link_uses_configured_jaeger_url(
    store_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONVEYOR_JAEGER_URL", "https://jaeger.example.com/")
    assert main(["trace", "t-traced", "--json"]) == 0
    assert f'"url": "https://jaeger.example.com/trace/{TRACE}"' in capsys.readouterr().out


def test_trace_fails_for_unknown_task_and_task_without_trace(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["trace", "t-missing"]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["trace", "t-untraced"]) == 1
    assert "no trace id" in capsys.readouterr().err
    assert main(["trace", "t-traced", "--tenant", "globex"]) == 1


def test_status_and_trace_ask_for_a_tenant_when_an_id_is_two_tenants(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(store_url)
    store.apply(
        TaskUpdate(
            "t-traced",
            "e-3",
            "conveyor.task.preprocessed.v1",
            "processing",
            datetime.now(UTC),
            tenant="globex",
        )
    )
    store.close()
    assert main(["trace", "t-traced"]) == 2
    assert "several tenants ('acme', 'globex')" in capsys.readouterr().err
    assert main(["status", "t-traced"]) == 2
    assert "use --tenant" in capsys.readouterr().err
    assert main(["trace", "t-traced", "--tenant", "acme"]) == 0
    assert TRACE in capsys.readouterr().out
    assert main(["status", "t-traced", "--tenant", "globex", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"tenant": "globex"' in out and TRACE not in out
