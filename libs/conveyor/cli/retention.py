"""`conveyor retention sweep`: delete what retention has expired, now (cron, or after a policy
change); writeback also sweeps every `CONVEYOR_RETENTION_SWEEP_S`. The store is the pipeline's
(`CONVEYOR_STORE_URL`, else the one `conveyor up` uses); the tombstone horizon and chunk size
are the retention settings (`conveyor.retention`, docs/reuse.md).
"""

from __future__ import annotations

import argparse
import json

from conveyor.cli.common import store_url


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    sweep = actions.add_parser("sweep", help="delete expired timelines, results and tombstones")
    sweep.add_argument("--json", action="store_true", help="machine-readable output")
    sweep.set_defaults(func=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    from pydantic import SecretStr

    from conveyor.retention import RetentionSettings, sweep
    from conveyor.store import open_store

    settings = RetentionSettings(store_url=SecretStr(store_url()))
    store = open_store(settings.store_url)
    try:
        report = sweep(store, settings)
    finally:
        store.close()
    counts = {
        "events": report.events,
        "purged": report.purged,
        "deleted": report.deleted,
        "reuse": report.reuse,
    }
    if args.json:
        print(json.dumps(counts))
    else:
        print(
            f"timeline events deleted {report.events}, expired tasks purged {report.purged}, "
            f"tombstones deleted {report.deleted}, reuse entries deleted {report.reuse}"
        )
    return 0
