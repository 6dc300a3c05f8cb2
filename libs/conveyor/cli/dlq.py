"""`conveyor dlq list|show|redrive`: inspect dead letters and send them back once fixed.

Filters (all optional, all must match): `--stage`, `--error-class` (repeatable, any of them),
`--since`/`--until` (RFC 3339 or relative: `30m`, `2h`, `1d`), `--task-id`, `--tenant`,
`--trace-id`.
Reads are bounded: what the DLQs held when the command started. See `conveyor.dlq.redrive` for
what a redrive sends and how it avoids redriving a record twice.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from conveyor.cli.common import kafka_settings
from conveyor.dlq.records import DeadLetter, DeadLetterFilter, TimeSpecError
from conveyor.errors import BrokerError

MESSAGE_WIDTH = 60
VALUE_PREVIEW = 4000


def configure(_name: str, parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="one line per dead letter")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = sub.add_parser("show", help="dead letters in full: every header, the decoded event")
    show.add_argument("ref", nargs="?", help="<stage|dlq topic>:<partition>:<offset>")
    again = sub.add_parser("redrive", help="republish to the stage input with a fresh budget")
    again.add_argument("--dry-run", action="store_true", help="list what would be redriven")
    again.add_argument("--rate", type=float, default=None, help="at most N records per second")
    for cmd in (listing, show, again):
        _filters(cmd)
    parser.set_defaults(func=run)


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", help="one stage (default: every stage)")
    parser.add_argument(
        "--error-class",
        action="append",
        default=[],
        dest="error_classes",
        help="e.g. PermanentError, DecodeError (repeatable)",
    )
    parser.add_argument("--since", help="dead-lettered at or after (RFC 3339, or 1h = 1 h ago)")
    parser.add_argument("--until", help="dead-lettered before (RFC 3339 or relative)")
    parser.add_argument("--task-id")
    parser.add_argument(
        "--tenant", help="only that tenant's letters (task ids are per tenant, like tasks)"
    )
    parser.add_argument("--trace-id", help="32 hex digits, from traceparent / ce_traceparent")


def run(args: argparse.Namespace) -> int:
    try:
        flt = DeadLetterFilter.build(
            stage=args.stage,
            error_classes=args.error_classes,
            since=args.since,
            until=args.until,
            task_id=args.task_id,
            trace_id=args.trace_id,
            tenant=args.tenant,
        )
        action = {"list": list_letters, "show": show_letters, "redrive": redrive_letters}
        return action[args.action](args, flt)
    except (TimeSpecError, ValueError) as exc:
        print(f"conveyor dlq: {exc}", file=sys.stderr)
        return 2
    except BrokerError as exc:
        print(f"conveyor dlq: kafka failed: {exc}", file=sys.stderr)
        return 1


def list_letters(args: argparse.Namespace, flt: DeadLetterFilter) -> int:
    from conveyor.dlq.reader import open_reader
    from conveyor.dlq.scan import scan

    settings = kafka_settings()
    with open_reader(settings) as consumer:
        found = scan(consumer, settings, flt)
    for dl in found.letters:
        redriven = dl.ref in found.redriven
        print(json.dumps(summary(dl, redriven)) if args.json else line(dl, redriven))
    done = sum(dl.ref in found.redriven for dl in found.letters)
    print(f"{len(found.letters)} dead letters, {done} already redriven", file=sys.stderr)
    return 0


def summary(dl: DeadLetter, redriven: bool) -> dict[str, Any]:
    return {
        "time": _iso(dl),
        "stage": dl.stage,
        "task_id": dl.task_id,
        "tenant": dl.tenant or None,
        "error_class": dl.error_class,
        "message": dl.message,
        "original": dl.original,
        "dlq": dl.ref,
        "redriven": redriven,
    }


def line(dl: DeadLetter, redriven: bool) -> str:
    message = " ".join(dl.message.split())
    if len(message) > MESSAGE_WIDTH:
        message = message[: MESSAGE_WIDTH - 1] + "…"
    mark = "  redriven" if redriven else ""
    return (
        f"{_iso(dl)}  {dl.stage:<10} {dl.task_id or '-':<24} {dl.error_class or '-':<18} "
        f"{message:<{MESSAGE_WIDTH}}  original={dl.original}  "
        f"dlq={dl.partition}:{dl.offset}{mark}"
    )


def _iso(dl: DeadLetter) -> str:
    return dl.time.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def show_letters(args: argparse.Namespace, flt: DeadLetterFilter) -> int:
    from conveyor.dlq.ledger import redriven_refs
    from conveyor.dlq.reader import open_reader
    from conveyor.dlq.scan import find, parse_ref, scan

    settings = kafka_settings()
    with open_reader(settings) as consumer:
        if args.ref:
            one = find(consumer, parse_ref(args.ref, settings))
            letters = [one] if one is not None and flt.matches(one) else []
            redriven = redriven_refs(consumer, settings)
        else:
            found = scan(consumer, settings, flt)
            letters, redriven = found.letters, found.redriven
    if not letters:
        print("no matching dead letter", file=sys.stderr)
        return 1
    for dl in letters:
        print(full(dl, dl.ref in redriven))
    return 0


def full(dl: DeadLetter, redriven: bool) -> str:
    lines = [
        f"dead letter {dl.ref}" + ("  (redriven)" if redriven else ""),
        f"  time: {_iso(dl)}",
        f"  key: {dl.key!r}",
        "  headers:",
    ]
    for key, value in dl.headers:
        text = (value or b"").decode("utf-8", "replace")
        if "\n" in text:
            lines.append(f"    {key}:")
            lines += [f"      {row}" for row in text.rstrip().splitlines()]
        else:
            lines.append(f"    {key}: {text}")
    lines += _value_lines(dl)
    return "\n".join(lines)


def _value_lines(dl: DeadLetter) -> list[str]:
    from conveyor.errors import PermanentError
    from conveyor.events.avro import default_schemas
    from conveyor.events.codec import decode

    try:
        event = decode(dl.headers, dl.value, default_schemas())
    except PermanentError as exc:
        text = _preview(dl.value[:VALUE_PREVIEW])
        return [
            f"  value: not a CloudEvent ({type(exc).__name__}: {exc}), {len(dl.value)} bytes:",
            f"    {text}",
        ]
    attrs = {
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "subject": event.subject,
        "time": event.time,
        "datacontenttype": event.datacontenttype,
        "dataschema": event.dataschema,
        **dict(event.extensions),
    }
    body = json.dumps(event.data, indent=2, default=repr, ensure_ascii=False)
    return (
        [f"  value: CloudEvent, {len(dl.value)} bytes"]
        + [f"    {k}: {v}" for k, v in attrs.items() if v is not None]
        + ["    data:"]
        + [f"      {row}" for row in body.splitlines()]
    )


def _preview(raw: bytes) -> str:
    """Text when the bytes are printable UTF-8, else hex (no control bytes on a terminal)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return raw.hex()
    return text if all(c.isprintable() or c in "\n\t" for c in text) else raw.hex()


def redrive_letters(args: argparse.Namespace, flt: DeadLetterFilter) -> int:
    from conveyor.dlq.redrive import Redriven, redrive
    from conveyor.telemetry.tracing import init_tracing, shutdown_tracing

    if args.rate is not None and args.rate <= 0:
        raise ValueError("--rate must be positive")
    verb = "would redrive" if args.dry_run else "redriven"

    def on_record(r: Redriven) -> None:
        print(
            f"{verb} {r.letter.ref} -> {r.topic} task={r.letter.task_id or '-'} "
            f"error={r.letter.error_class or '-'}"
            + (f" traceparent={r.traceparent}" if r.traceparent else "")
        )

    init_tracing("dlq-redrive")
    try:
        report = redrive(
            kafka_settings(), flt, dry_run=args.dry_run, rate=args.rate, on_record=on_record
        )
    finally:
        shutdown_tracing()
    print(
        f"redrive: matched={report.matched} {verb.replace(' ', '_')}={len(report.redriven)} "
        f"already_redriven={report.already_redriven} unroutable={report.unroutable}"
    )
    return 0
