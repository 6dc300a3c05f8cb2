"""The demo's example tasks: valid requests, ids fresh for every run."""

from __future__ import annotations

import json

import pytest

from conveyor.events.ingress import TaskRequest
from conveyor.local.demo import load_tasks
from conveyor.local.webhooks import local_webhooks
from conveyor.paths import repo_root
from conveyor.services.notify.settings import NotifySettings
from conveyor.webhooks import new_secret, secret_key
from conveyor.webhooks.policy import DestinationPolicy

EXAMPLES = repo_root() / "examples" / "tasks.jsonl"


def test_every_run_gets_its_own_task_ids_and_the_receiver_as_callback() -> None:
    first = load_tasks(EXAMPLES, "http://127.0.0.1:9/hooks", "a1b2")
    second = load_tasks(EXAMPLES, "http://127.0.0.1:9/hooks", "c3d4")
    assert len(first) == len(second) == 10
    assert all(t["task_id"].endswith("-a1b2") for t in first)
    assert not {t["task_id"] for t in first} & {t["task_id"] for t in second}
    assert {t["callback_url"] for t in first} == {"http://127.0.0.1:9/hooks"}
    for task in first:
        TaskRequest.model_validate(task)


def test_the_local_stack_gives_each_known_tenant_a_secret_and_allows_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CONVEYOR_WEBHOOK_SECRETS", raising=False)
    monkeypatch.delenv("CONVEYOR_WEBHOOK_ALLOW", raising=False)
    hooks = local_webhooks('{"tok": "acme"}', EXAMPLES)
    assert set(hooks.secrets) == {"acme", "demo", "default"}
    assert len(set(hooks.secrets.values())) == 3  # no secret shared between tenants
    settings = NotifySettings(
        stage="notify",
        webhook_secrets=json.loads(hooks.env["CONVEYOR_WEBHOOK_SECRETS"]),
        webhook_allow=hooks.env["CONVEYOR_WEBHOOK_ALLOW"],
    )
    assert settings.webhook_keys("demo") == [secret_key(hooks.secrets["demo"])]
    assert DestinationPolicy(settings.webhook_allow).check("http://127.0.0.1:9/h").addresses
    given = new_secret()
    monkeypatch.setenv("CONVEYOR_WEBHOOK_SECRETS", json.dumps({"acme": [given]}))
    monkeypatch.setenv("CONVEYOR_WEBHOOK_ALLOW", "")
    hooks = local_webhooks("{}", None)
    assert hooks.secrets == {"acme": given} and hooks.env["CONVEYOR_WEBHOOK_ALLOW"] == ""
