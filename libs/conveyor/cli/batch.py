"""`conveyor batch submit|list|status|cancel|results`: batch jobs through the gateway's HTTP API.

The gateway is `--url` (default `CONVEYOR_GATEWAY_URL`, else http://127.0.0.1:8080) and the
bearer token is read from `CONVEYOR_TOKEN`, never from the command line (arguments are visible
to every user of the machine). `submit` sends the JSONL file and, unless `--no-wait`, follows
the batch with a progress bar until it ends, then optionally writes its results (`--results`).
Ctrl-C stops following, never the batch: `conveyor batch cancel <id>` does that.
Exit codes: 0 the batch completed (whatever its tasks' outcomes), 1 it ended otherwise
(cancelled, expired, failed) or was refused, 130 interrupted while following.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

ENDED = frozenset({"completed", "cancelled", "expired", "failed"})
DEFAULT_URL = "http://127.0.0.1:8080"
# A 20,000-task file takes a few seconds to check and store; 10 minutes bounds a huge one.
SUBMIT_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 60.0
BAR_WIDTH = 30
# Without a terminal (CI logs, pipes) a line per interval instead of a redrawn bar.
PLAIN_EVERY_S = 10.0
_DONE = ("completed", "blocked", "failed", "expired", "cancelled")


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("CONVEYOR_GATEWAY_URL", DEFAULT_URL))
    sub = parser.add_subparsers(dest="action", required=True)
    submit_cmd = sub.add_parser("submit", help="submit a JSONL file of tasks as one batch")
    submit_cmd.add_argument("file", type=Path, help="one {custom_id, body} request per line")
    submit_cmd.add_argument("--window", default="24h", help="completion window, e.g. 24h, 90m")
    submit_cmd.add_argument("--metadata", help="JSON object of strings kept with the batch")
    submit_cmd.add_argument("--no-wait", action="store_true", help="print the batch and return")
    submit_cmd.add_argument("--results", type=Path, help="when it ends, write the results here")
    submit_cmd.add_argument("--poll-s", type=float, default=1.0, help="progress refresh interval")
    submit_cmd.set_defaults(func=submit)
    list_cmd = sub.add_parser("list", help="list the tenant's batches, newest first")
    list_cmd.add_argument("--limit", type=int, default=20, help="batches to show (1-100)")
    list_cmd.add_argument("--after", help="show the batches older than this batch id")
    list_cmd.add_argument("--json", action="store_true", help="the list object as JSON")
    list_cmd.set_defaults(func=list_batches)
    for action, func, text in (
        ("status", status, "show a batch's status and counts"),
        ("cancel", cancel, "cancel a batch: its unfinished tasks end cancelled"),
        ("results", results, "write a batch's results (JSONL, input order)"),
    ):
        cmd = sub.add_parser(action, help=text)
        cmd.add_argument("batch_id")
        if action == "results":
            cmd.add_argument("-o", "--output", type=Path, help="file to write; default stdout")
        else:
            cmd.add_argument("--json", action="store_true", help="the batch object as JSON")
        cmd.set_defaults(func=func)


def _client(args: argparse.Namespace) -> httpx.Client:
    token = os.environ.get("CONVEYOR_TOKEN")
    if not token:
        raise SystemExit("set CONVEYOR_TOKEN to the tenant's bearer token")
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.Client(base_url=args.url, headers=headers, timeout=REQUEST_TIMEOUT_S)


def _checked(answer: httpx.Response) -> dict[str, Any]:
    if answer.status_code >= 400:
        raise SystemExit(_refusal(answer))
    body: dict[str, Any] = answer.json()
    return body


def _refusal(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return f"HTTP {answer.status_code}: {answer.text[:300]}"
    lines = [f"HTTP {answer.status_code}: {body.get('error') or body.get('status')}"]
    for error in body.get("errors") or []:
        where = f"line {error['line']}: " if "line" in error else ""
        lines.append(f"  {where}{error.get('message')}")
    if body.get("error_count", 0) > len(body.get("errors") or []):
        lines.append(f"  ... {body['error_count']} in all")
    return "\n".join(lines)


def submit(args: argparse.Namespace) -> int:
    params = {"completion_window": args.window}
    if args.metadata:
        params["metadata"] = args.metadata
    with _client(args) as http:
        answer = http.post(
            "/v1/batches",
            content=args.file.read_bytes(),
            params=params,
            headers={"Content-Type": "application/jsonl"},
            timeout=SUBMIT_TIMEOUT_S,
        )
        batch = _checked(answer)
        print(f"batch {batch['id']}: {batch['request_counts']['total']} tasks, {batch['status']}")
        if args.no_wait or batch["status"] in ENDED:
            return _outcome(http, batch, args.results)
        try:
            batch = follow(http, batch, poll_s=args.poll_s, out=sys.stderr)
        except KeyboardInterrupt:
            print(f"\nstopped following; the batch runs on: conveyor batch status {batch['id']}")
            return 130
        return _outcome(http, batch, args.results)


def follow(http: httpx.Client, batch: dict[str, Any], *, poll_s: float, out: IO[str]) -> Any:
    """Poll the batch until it ends, drawing its progress on `out`."""
    tty = out.isatty()
    started = last_plain = time.monotonic()
    while batch["status"] not in ENDED:  # the window ends every batch; Ctrl-C stops sooner
        time.sleep(poll_s)
        batch = _checked(http.get(f"/v1/batches/{batch['id']}"))
        now = time.monotonic()
        if tty:
            out.write("\r" + progress_line(batch, now - started))
        elif now - last_plain >= PLAIN_EVERY_S or batch["status"] in ENDED:
            out.write(progress_line(batch, now - started) + "\n")
            last_plain = now
        out.flush()
    if tty:
        out.write("\n")
    return batch


def progress_line(batch: dict[str, Any], elapsed_s: float) -> str:
    counts = batch["request_counts"]
    total = max(int(counts["total"]), 1)
    done = sum(int(counts.get(status, 0)) for status in _DONE)
    filled = BAR_WIDTH * done // total
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    shown = ", ".join(f"{s} {counts[s]}" for s in _DONE if counts.get(s))
    return f"[{bar}] {done}/{total} {shown or 'waiting'} ({elapsed_s:.0f} s)"


def _outcome(http: httpx.Client, batch: dict[str, Any], results_path: Path | None) -> int:
    _print_batch(batch)
    if results_path is not None and batch["status"] in ENDED:
        with results_path.open("w", encoding="utf-8") as out:
            written = _write_results(http, batch["id"], out)
        print(f"results: {written} lines in {results_path}")
    if batch["status"] not in ENDED:
        return 0  # --no-wait: accepted
    return 0 if batch["status"] == "completed" else 1


def _print_batch(batch: dict[str, Any]) -> None:
    counts = {k: v for k, v in batch["request_counts"].items() if v and k != "total"}
    print(f"batch {batch['id']} {batch['status']}: {counts or 'no tasks ended yet'}")
    for error in batch.get("errors") or []:
        print(f"  error: {error['message']}")


def _write_results(http: httpx.Client, batch_id: str, out: IO[str]) -> int:
    written = 0
    with http.stream("GET", f"/v1/batches/{batch_id}/results") as answer:
        if answer.status_code >= 400:
            answer.read()
            raise SystemExit(_refusal(answer))
        for line in answer.iter_lines():
            if line:
                out.write(line + "\n")
                written += 1
    return written


def list_batches(args: argparse.Namespace) -> int:
    params: dict[str, str | int] = {"limit": args.limit}
    if args.after:
        params["after"] = args.after
    with _client(args) as http:
        page = _checked(http.get("/v1/batches", params=params))
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    for batch in page["data"]:
        print(list_line(batch))
    if not page["data"]:
        print("no batches")
    elif page["has_more"]:
        print(f"more: conveyor batch list --after {page['last_id']}")
    return 0


def list_line(batch: dict[str, Any]) -> str:
    """One batch in `conveyor batch list`: id, status, created, tasks ended of total."""
    counts = batch["request_counts"]
    done = sum(int(counts.get(status, 0)) for status in _DONE)
    return f"{batch['id']}  {batch['status']:<11}  {batch['created_at']}  {done}/{counts['total']}"


def status(args: argparse.Namespace) -> int:
    with _client(args) as http:
        batch = _checked(http.get(f"/v1/batches/{args.batch_id}"))
    if args.json:
        print(json.dumps(batch, indent=2))
    else:
        _print_batch(batch)
        print(progress_line(batch, 0).rsplit(" (", 1)[0])
    return 0


def cancel(args: argparse.Namespace) -> int:
    with _client(args) as http:
        batch = _checked(http.post(f"/v1/batches/{args.batch_id}/cancel"))
    if args.json:
        print(json.dumps(batch, indent=2))
    else:
        _print_batch(batch)
    return 0


def results(args: argparse.Namespace) -> int:
    with _client(args) as http:
        if args.output is None:
            _write_results(http, args.batch_id, sys.stdout)
            return 0
        with args.output.open("w", encoding="utf-8") as out:
            written = _write_results(http, args.batch_id, out)
    print(f"{written} lines in {args.output}", file=sys.stderr)
    return 0
