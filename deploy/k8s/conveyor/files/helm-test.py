"""`helm test` for a Conveyor release: submit one task and wait until it completes.

Submits with `conveyor submit` (to the release's Kafka), then polls the task's status through the
release's gateway (`CONVEYOR_TEST_GATEWAY_URL`, with the first token of
`CONVEYOR_TEST_GATEWAY_TOKENS`) or, without a gateway, with `conveyor status` against the store.
Exits 0 once the task is `completed`; non-zero on any other final status or after the deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

FINAL_FAILURES = {"failed", "blocked", "expired"}
# One gateway call or `conveyor status` run: a slow answer is retried, not waited on forever.
CALL_TIMEOUT_S = 30.0


def gateway_status(base: str, token: str, task_id: str) -> str:
    request = urllib.request.Request(
        f"{base}/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_S) as answer:
            return str(json.load(answer)["status"])
    except urllib.error.HTTPError as err:
        if err.code == 404:  # not stored yet
            return "pending"
        raise


def store_status(task_id: str, tenant: str) -> str:
    proc = subprocess.run(
        ["conveyor", "status", task_id, "--tenant", tenant, "--json"],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        check=False,
    )
    return str(json.loads(proc.stdout)["status"]) if proc.returncode == 0 else "pending"


def submit(tenant: str) -> str | None:
    """`conveyor submit` one task for `tenant`; its task id, or None (reason on stderr)."""
    command = ["conveyor", "submit", "--kind", os.environ["CONVEYOR_TEST_KIND"]]
    command += ["--input", os.environ["CONVEYOR_TEST_INPUT"], "--tenant", tenant]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=CALL_TIMEOUT_S * 4, check=False
    )
    if proc.returncode != 0 or not proc.stdout.split():
        print(f"conveyor submit failed: {proc.stderr.strip()}", file=sys.stderr)
        return None
    return proc.stdout.split()[0]


def poll(task_id: str, tenant: str, gateway: str, token: str, deadline: float) -> int:
    """Follow the task until a final status or the deadline; 0 only when it completed."""
    poll_s = float(os.environ.get("CONVEYOR_TEST_POLL_S", "5"))
    last = ""
    while time.monotonic() < deadline:
        try:
            if gateway:
                status = gateway_status(gateway, token, task_id)
            else:
                status = store_status(task_id, tenant)
        except (OSError, ValueError, KeyError) as err:  # gateway restarting, bad answer: retry
            status = f"unknown ({type(err).__name__})"
        if status != last:
            print(f"{task_id}: {status}", flush=True)
            last = status
        if status == "completed":
            return 0
        if status in FINAL_FAILURES:
            return 1
        time.sleep(poll_s)
    print(f"{task_id}: not completed in time (last status {last})", file=sys.stderr)
    return 1


def main() -> int:
    deadline = time.monotonic() + float(os.environ["CONVEYOR_TEST_TIMEOUT_S"])
    gateway = os.environ.get("CONVEYOR_TEST_GATEWAY_URL", "")
    tenant, token = "helm-test", ""
    if gateway:
        tokens = json.loads(os.environ.get("CONVEYOR_TEST_GATEWAY_TOKENS") or "{}")
        if not tokens:
            print("no gateway token in the release's Secret", file=sys.stderr)
            return 1
        token, tenant = next(iter(tokens.items()))
    task_id = submit(tenant)
    if task_id is None:
        return 1
    print(f"submitted {task_id} for tenant {tenant}", flush=True)
    return poll(task_id, tenant, gateway, token, deadline)


if __name__ == "__main__":
    sys.exit(main())
