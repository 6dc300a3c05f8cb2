"""Reading a batch's input file: JSONL, one request per line, every line checked before any runs.

A line has the OpenAI Batch API's shape: `{"custom_id": "...", "method": "POST", "url":
"/v1/tasks", "body": {task}}` (`method` and `url` may be left out; other values are refused).
`body` is a task as `POST /v1/tasks` takes it, checked with the same ingress models and rules,
except that the batch names its tasks (`task_id` is refused: `custom_id` is the caller's id) and
the task's tenant is the token's. A task's priority defaults to `low` (batch work must not slow
interactive work) and its deadline is the batch's expiry, or its own if earlier. `custom_id` is
1 to 256 characters and unique within the file. Blank lines are skipped; line numbers count
every line of the file, from 1, and are what the errors and the results' order refer to. Any
invalid line refuses the whole file, with every problem listed by line (up to `MAX_ERRORS`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from conveyor.events.ingress import InvalidTaskError, TaskRequest, TaskRules, parse_task

# Enough to fix a file in one round without an answer the size of the file itself.
MAX_ERRORS = 100
MAX_CUSTOM_ID = 256
BATCH_LOW_PRIORITY = "low"
_LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One valid input line: its number, the caller's id, the task body as it will be sent."""

    line: int
    custom_id: str
    body: dict[str, Any]
    task: TaskRequest


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    message: str
    fields: tuple[str, ...] = ()

    def view(self) -> dict[str, Any]:
        return {"line": self.line, "message": self.message, "fields": list(self.fields)}


class InvalidBatchError(ValueError):
    """The file is refused; `errors` lists the first problems by line, `count` all of them."""

    def __init__(self, message: str, errors: list[LineError], count: int) -> None:
        super().__init__(message)
        self.errors = errors
        self.count = count


@dataclass(frozen=True, slots=True)
class BatchInput:
    """What every line of a batch gets from the batch: its tenant, task ids and deadline."""

    tenant: str
    expires_at: datetime
    task_id: Callable[[int], str]  # line number -> task id
    rules: TaskRules | None = None
    max_tasks: int = 50_000
    check_callback: Callable[[str], str | None] | None = None  # url -> why refused, or None


def parse_batch(data: bytes, spec: BatchInput) -> list[BatchLine]:
    """Every request of the file, in order; `InvalidBatchError` if any line is invalid."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidBatchError(f"the file is not UTF-8 (byte {exc.start})", [], 1) from None
    lines: list[BatchLine] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(lines) + len(errors) >= spec.max_tasks:
            raise InvalidBatchError(f"the file has more than {spec.max_tasks} requests", [], 1)
        try:
            parsed = _line(number, raw, spec)
        except LineProblem as problem:
            errors.append(LineError(number, str(problem), problem.fields))
            continue
        if (first := seen.get(parsed.custom_id)) is not None:
            message = f"custom_id {parsed.custom_id!r} repeats line {first}"
            errors.append(LineError(number, message, ("custom_id",)))
            continue
        seen[parsed.custom_id] = number
        lines.append(parsed)
    if errors:
        shown = errors[:MAX_ERRORS]
        raise InvalidBatchError(f"{len(errors)} invalid line(s)", shown, len(errors))
    if not lines:
        raise InvalidBatchError("the file has no requests", [], 1)
    return lines


class LineProblem(ValueError):
    def __init__(self, message: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = fields


def _line(number: int, raw: str, spec: BatchInput) -> BatchLine:
    try:
        request = json.loads(raw)
    except RecursionError:
        raise LineProblem("the line nests too deeply") from None
    except ValueError as exc:
        raise LineProblem(f"not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise LineProblem("a line must be a JSON object")
    if unknown := sorted(set(request) - _LINE_KEYS):
        raise LineProblem(f"unknown key(s) {', '.join(unknown)}", tuple(unknown))
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        raise LineProblem(
            f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters", ("custom_id",)
        )
    if request.get("method", "POST") != "POST":
        raise LineProblem("method must be POST", ("method",))
    if request.get("url", "/v1/tasks") != "/v1/tasks":
        raise LineProblem("url must be /v1/tasks", ("url",))
    body = request.get("body")
    if not isinstance(body, dict):
        raise LineProblem("body must be a JSON object (a task)", ("body",))
    return BatchLine(number, custom_id, *_task(number, body, spec))


def _task(
    number: int, body: Mapping[str, Any], spec: BatchInput
) -> tuple[dict[str, Any], TaskRequest]:
    if body.get("task_id") is not None:
        raise LineProblem(
            "a batch names its tasks: leave out task_id, use custom_id", ("body.task_id",)
        )
    if body.get("tenant") not in (None, spec.tenant):
        raise LineProblem("the task names another tenant than the token's", ("body.tenant",))
    task = {**body, "tenant": spec.tenant, "task_id": spec.task_id(number)}
    if task.get("priority") is None:
        task["priority"] = BATCH_LOW_PRIORITY
    try:
        parsed = parse_task(task, spec.rules)
    except InvalidTaskError as exc:
        fields = tuple(f"body.{f}" for f in exc.fields)
        raise LineProblem(str(exc), fields) from None
    if parsed.deadline is None or parsed.deadline > spec.expires_at:
        task["deadline"] = spec.expires_at.isoformat()
        parsed = parsed.model_copy(update={"deadline": spec.expires_at})
    check = spec.check_callback
    if parsed.callback_url and check is not None and (refused := check(parsed.callback_url)):
        raise LineProblem(refused, ("body.callback_url",))
    return task, parsed
