"""Webhook settings for the local stack (`conveyor up`): per-tenant secrets and the allowlist.

Outside the local stack nothing is made up: a tenant without its own secret gets no webhook.
Locally, `conveyor up` gives every tenant it knows of (the gateway tokens' tenants, `demo`,
`default` for `conveyor submit`, and with `--demo` the example tasks' tenants) a fresh
`whsec_` secret, unless `CONVEYOR_WEBHOOK_SECRETS` is set, and lets webhooks reach loopback
receivers (the demo's receiver listens on 127.0.0.1), unless `CONVEYOR_WEBHOOK_ALLOW` is set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from conveyor.webhooks import new_secret

LOCAL_ALLOW = "127.0.0.0/8,::1/128"


@dataclass(frozen=True, slots=True)
class LocalWebhooks:
    env: dict[str, str]  # CONVEYOR_WEBHOOK_* for the services
    secrets: dict[str, str]  # tenant -> the secret a local receiver verifies with
    allow_note: str


def local_webhooks(gateway_tokens: str, tasks_file: Path | None) -> LocalWebhooks:
    given = os.environ.get("CONVEYOR_WEBHOOK_SECRETS")
    if given:
        secrets = {t: _first(v) for t, v in json.loads(given).items()}
        env = {"CONVEYOR_WEBHOOK_SECRETS": given}
    else:
        tenants = {"demo", "default"} | _token_tenants(gateway_tokens) | _task_tenants(tasks_file)
        secrets = {tenant: new_secret() for tenant in sorted(tenants)}
        env = {"CONVEYOR_WEBHOOK_SECRETS": json.dumps(secrets)}
    allow = os.environ.get("CONVEYOR_WEBHOOK_ALLOW")
    env["CONVEYOR_WEBHOOK_ALLOW"] = allow if allow is not None else LOCAL_ALLOW
    note = "destinations allowed by CONVEYOR_WEBHOOK_ALLOW"
    if allow is None:
        note = f"loopback receivers allowed locally ({LOCAL_ALLOW})"
    return LocalWebhooks(env, secrets, note)


def _first(value: object) -> str:
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return str(value).split()[0] if str(value).split() else ""


def _token_tenants(tokens: str) -> set[str]:
    try:
        parsed = json.loads(tokens)
    except ValueError:
        return set()
    if not isinstance(parsed, dict):
        return set()
    return {v for v in parsed.values() if isinstance(v, str) and v}


def _task_tenants(tasks_file: Path | None) -> set[str]:
    if tasks_file is None or not tasks_file.is_file():
        return set()
    tenants = set()
    for line in tasks_file.read_text().splitlines():
        if line.strip():
            tenant = json.loads(line).get("tenant")
            if isinstance(tenant, str) and tenant:
                tenants.add(tenant)
    return tenants
