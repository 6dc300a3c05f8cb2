"""`conveyor up [--demo] [--exit-when-done]`: the whole pipeline locally, in one command.

Starts a single-node Kafka broker (unless `CONVEYOR_KAFKA_BOOTSTRAP` names a cluster), applies
the topics, starts every service as its own process and keeps them running (restarting any that
die) until Ctrl-C. `--demo` also starts a local webhook receiver, submits `examples/tasks.jsonl`,
shows progress and prints a results table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import time
from pathlib import Path

from conveyor.cli.common import up_state_path
from conveyor.local.process import SERVICES
from conveyor.local.stack import LocalStack
from conveyor.paths import private_dir, repo_root, var_dir
from conveyor.settings import default_store_url

log = logging.getLogger("conveyor.up")
DEMO_TIMEOUT_S = 600.0


def configure(_name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demo", action="store_true", help="submit the example tasks")
    parser.add_argument(
        "--exit-when-done",
        action="store_true",
        help="with --demo: stop everything once every task is done",
    )
    parser.add_argument("--tasks", type=Path, default=repo_root() / "examples" / "tasks.jsonl")
    parser.add_argument(
        "--store",
        default=os.environ.get("CONVEYOR_STORE_URL"),
        help="result store URL (default: SQLite under var/)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    stopping = {"flag": False}

    def on_signal(_signum: int, _frame: object) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    private_dir(var_dir())  # store, logs, broker data: tightened even if an older run made it
    workdir = var_dir() / "up"
    broker = None
    bootstrap = os.environ.get("CONVEYOR_KAFKA_BOOTSTRAP")
    if not bootstrap:
        from conveyor.broker.local import LocalBroker

        print("starting Kafka broker ...", flush=True)
        broker = LocalBroker(var_dir() / "broker-up")
        broker.start()
        bootstrap = broker.bootstrap
        print(f"broker ready at {bootstrap} in {getattr(broker, 'ready_seconds', 0):.1f}s")
    store_url = args.store or default_store_url()
    secret = os.environ.get("CONVEYOR_WEBHOOK_DEFAULT_SECRET") or secrets.token_hex(16)
    token = secrets.token_urlsafe(16)
    tokens = os.environ.get("CONVEYOR_GATEWAY_TOKENS") or json.dumps({token: "demo"})
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": bootstrap,
        "CONVEYOR_STORE_URL": store_url,
        "CONVEYOR_WEBHOOK_DEFAULT_SECRET": secret,
        "CONVEYOR_GATEWAY_TOKENS": tokens,
    }
    stack = LocalStack(workdir, env, services=(*SERVICES, "gateway"))
    try:
        created = stack.apply_topics()
        print(f"topics applied ({len(created)} created)")
        print("starting services (inference loads its models) ...", flush=True)
        stack.start()
        up_state_path().write_text(
            json.dumps({"bootstrap": bootstrap, "store_url": store_url, "pid": os.getpid()})
        )
        for name, proc in stack.procs.items():
            print(
                f"  {name:<11} pid={proc.proc.pid if proc.proc else '-'} "
                f"metrics=http://{proc.address}/metrics log={proc.log_path}"
            )
        port = os.environ.get("CONVEYOR_GATEWAY_PORT", "8080")
        if "CONVEYOR_GATEWAY_TOKENS" not in os.environ:
            print(f"gateway: http://127.0.0.1:{port}/v1/tasks  (tenant demo, token {token})")
        if args.demo:
            from conveyor.local.demo import run_demo

            ok = run_demo(
                stack,
                args.tasks,
                store_url,
                secret,
                lambda: stopping["flag"],
                timeout_s=DEMO_TIMEOUT_S,
            )
            if args.exit_when_done:
                return 0 if ok else 1
        print("pipeline running; Ctrl-C stops it", flush=True)
        while not stopping["flag"]:
            for name in stack.supervise():
                print(f"  restarted {name}", flush=True)
            time.sleep(0.5)
        return 0
    finally:
        print("stopping ...", flush=True)
        stack.stop()
        up_state_path().unlink(missing_ok=True)
        if broker is not None:
            broker.stop()
        print("stopped", flush=True)
