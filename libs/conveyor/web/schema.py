"""The gateway's API shapes: a task as JSON (HTTP answer and WebSocket message), and the OpenAPI
document that describes them, kept side by side so the two change together.

Times are RFC 3339 UTC strings; `result` is what writeback stored (withheld, null, for a blocked
task); `timeline` lists the task's events in event-time order.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from conveyor.events.ingress import TaskRequest
from conveyor.store import STATUSES, TaskEventRecord, TaskRecord
from conveyor.web.batchschema import BATCH_PATHS, BATCH_SCHEMAS


@dataclass(frozen=True, slots=True)
class Submitted:
    """What the gateway remembers of a task it accepted, until the store knows the task."""

    tenant: str
    trace_id: str | None
    at: float  # wall-clock submit time (seconds since the epoch)
    priority: str = "normal"  # its lane (the store does not keep it)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def task_view(task: TaskRecord) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "tenant": task.tenant,
        "kind": task.kind,
        "status": task.status,
        "stage": task.stage,
        "verdict": task.verdict,
        "moderation": task.moderation,
        "result": task.result,
        "error": task.error,
        "trace_id": task.trace_id,
        "created_at": _iso(task.created_at),
        "updated_at": _iso(task.updated_at),
        "completed_at": _iso(task.completed_at),
        "expires_at": _iso(task.expires_at),
    }


def pending_view(task_id: str, submitted: Submitted) -> dict[str, Any]:
    at = _iso(datetime.fromtimestamp(submitted.at, UTC))
    return {
        "task_id": task_id,
        "tenant": submitted.tenant,
        "kind": None,
        "status": "pending",
        "stage": None,
        "verdict": None,
        "moderation": None,
        "result": None,
        "error": None,
        "trace_id": submitted.trace_id,
        "created_at": at,
        "updated_at": at,
        "completed_at": None,
        "expires_at": None,
    }


def timeline_view(events: Sequence[TaskEventRecord]) -> list[dict[str, Any]]:
    return [
        {
            "event_id": e.event_id,
            "type": e.type,
            "status": e.status,
            "time": _iso(e.time),
            "stage": e.stage,
            "detail": e.detail,
        }
        for e in events
    ]


def _nullable(kind: str, description: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], "description": description, **extra}


def _task_request_schema() -> dict[str, Any]:
    schema = TaskRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    # The gateway fills both, absent or null: the tenant from the token, the id with a UUID.
    schema["required"] = [name for name in schema["required"] if name not in ("tenant", "task_id")]
    for name, description in (
        ("tenant", "defaults to the token's tenant; another: 403"),
        (
            "task_id",
            "defaults to a new UUID; ids are per tenant: the tenant's exact repeat answers 200, "
            "another body under an id it used 409",
        ),
    ):
        prop = schema["properties"][name]
        schema["properties"][name] = {
            "anyOf": [{k: v for k, v in prop.items() if k != "title"}, {"type": "null"}],
            "description": description,
        }
    return schema


_TASK: dict[str, Any] = {
    "type": "object",
    "properties": {
        "task_id": {"type": "string"},
        "tenant": _nullable("string"),
        "kind": _nullable("string"),
        "status": {"type": "string", "enum": sorted(STATUSES)},
        "stage": _nullable("string", "stage of the event that set the status"),
        "verdict": _nullable("string", "moderation verdict", enum=["allow", "flag", "block", None]),
        "moderation": {"description": "moderation scores and reasons"},
        "result": {"description": "the task's result; null until completed, withheld if blocked"},
        "error": _nullable("string", "why the task failed or expired"),
        "trace_id": _nullable("string", "W3C trace id (null when tracing is off)"),
        "created_at": _nullable("string", format="date-time"),
        "updated_at": _nullable("string", format="date-time"),
        "completed_at": _nullable("string", format="date-time"),
        "expires_at": _nullable(
            "string",
            "when retention deletes the finished task's result and timeline (then GET is 404 "
            "with reason `expired`); null: kept for ever, or not finished",
            format="date-time",
        ),
        "queue_position_estimate": _nullable(
            "integer",
            "pending tasks only: records on the ingress topic not yet taken by "
            "preprocess (its consumer group's lag, refreshed every few seconds), an upper bound "
            "on the task's place in the queue; null otherwise or when the lag is unavailable",
        ),
        "estimated_start": _nullable(
            "string",
            "pending tasks only: when inference is estimated to start the task (records ahead "
            "of it in its lane over the lane's recent service rate; docs/scheduling.md); "
            "null otherwise or while the rate is unknown",
            format="date-time",
        ),
    },
    "required": ["task_id", "status"],
}
_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event_id": {"type": "string"},
        "type": {"type": "string"},
        "status": {"type": "string"},
        "time": {"type": "string", "format": "date-time"},
        "stage": _nullable("string"),
        "detail": _nullable("string"),
    },
}
_ERROR = {
    "type": "object",
    "properties": {
        "error": {"type": "string"},
        "reason": {
            "type": "string",
            "description": "404 only: `expired` when retention deleted the task (then "
            "`expired_at` says when); absent for an unknown task",
        },
        "expired_at": {"type": "string", "format": "date-time"},
        "fields": {
            "type": "array",
            "items": {"type": "string"},
            "description": "422 only: each invalid field, e.g. params.seed",
        },
    },
    "required": ["error"],
}


def _answer(description: str, schema: str = "Error") -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _probe(summary: str, failed: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "security": [],
            "responses": {"200": {"description": "ok"}, "503": {"description": failed}},
        }
    }


_WS_MESSAGES = [
    {"$ref": f"#/components/schemas/{name}"} for name in ("TaskMessage", "StreamChunk", "StreamEnd")
]
_STREAM_CHUNK = {
    "type": "object",
    "description": "Partial text of a streaming task: the reader keeps "
    "`text = text[:offset] + chunk.text` (offsets in Unicode code points)",
    "required": ["type", "task_id", "offset", "text"],
    "properties": {
        "type": {"const": "chunk"},
        "task_id": {"type": "string"},
        "offset": {"type": "integer", "minimum": 0},
        "text": {"type": "string"},
    },
}
_STREAM_END = {
    "type": "object",
    "description": "The partial text stops: complete, moderation (the task goes on) or "
    "interrupted (a retry may start again at offset 0); the final TaskMessage has the result",
    "required": ["type", "task_id", "reason"],
    "properties": {
        "type": {"const": "stream_end"},
        "task_id": {"type": "string"},
        "reason": {"enum": ["complete", "moderation", "interrupted"]},
    },
}


_AUTH_ERRORS = {"401": _answer("missing or unknown bearer token")}
_TASK_ID = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
_PATHS: dict[str, Any] = {
    "/v1/tasks": {
        "post": {
            "summary": "Submit a task",
            "operationId": "submitTask",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/TaskRequest"}}
                },
            },
            "responses": {
                "200": _answer(
                    "a repeat of this tenant's same submission: nothing is published again; "
                    "`status` is the task's current one",
                    "TaskRepeated",
                ),
                "202": _answer("accepted: the broker holds the task", "TaskAccepted"),
                "400": _answer("body is not a JSON object, or nests too deeply"),
                **_AUTH_ERRORS,
                "403": _answer("the body names another tenant"),
                "408": _answer("the body did not arrive within the read timeout"),
                "409": _answer("this tenant already used the task id for another submission"),
                "413": _answer("body too large"),
                "415": _answer("the body is not application/json"),
                "422": _answer(
                    "invalid task (reason in `error`, invalid fields in `fields`; "
                    "`callback_url` for a refused webhook destination)"
                ),
                "429": {
                    **_answer(
                        "refused, not published: the tenant is over its submission rate or its "
                        "tasks in flight, or the task's deadline would pass before its "
                        "estimated start (docs/scheduling.md)"
                    ),
                    "headers": {
                        "Retry-After": {
                            "description": "seconds to wait before submitting again",
                            "schema": {"type": "integer", "minimum": 1},
                        }
                    },
                },
                "503": _answer("broker did not acknowledge in time; retry with the same task_id"),
            },
        }
    },
    "/v1/tasks/{task_id}": {
        "get": {
            "summary": "Status, timeline, result, trace id and queue position estimate of a task",
            "operationId": "getTask",
            "parameters": [_TASK_ID],
            "responses": {
                "200": _answer("the task", "TaskWithTimeline"),
                **_AUTH_ERRORS,
                "404": _answer("no such task for this tenant, or expired under retention"),
            },
        },
        "delete": {
            "summary": "Cancel a task (idempotent)",
            "description": "Records the cancel and publishes it before answering: every stage "
            "then skips the task, a generation in progress stops at its next token, and the "
            "task ends `cancelled` with one webhook and one WebSocket message. A repeat "
            "answers the same. A task that finished first is left as it is (409).",
            "operationId": "cancelTask",
            "parameters": [_TASK_ID],
            "responses": {
                "200": _answer("the task is cancelled (now or by an earlier call)", "Cancelled"),
                **_AUTH_ERRORS,
                "404": _answer("no such task for this tenant"),
                "409": _answer(
                    "the task finished first: nothing was cancelled (`cancelled` false, "
                    "`status` its terminal status)",
                    "NotCancelled",
                ),
                "501": _answer("cancellation is not configured on this gateway"),
                "503": _answer("store or broker unavailable: nothing accepted; retry"),
            },
        },
    },
    "/v1/tasks/{task_id}/events": {
        "get": {
            "summary": "WebSocket: one message per status change, closed after the terminal one",
            "description": "Upgrade to a WebSocket. Each status change is a `TaskMessage`; after "
            "the message with `final: true` the server closes the socket (1000). A generate task "
            "submitted with `params.stream: true` also gets its partial text before that, as "
            "`StreamChunk` and `StreamEnd` messages (docs/streaming.md). The token goes in "
            "the `Authorization` header or, from a browser, as the subprotocol "
            "`bearer.<base64url(token), no padding>` offered together with `conveyor.v1` "
            "(which the server selects). A token in the URL is refused (401).",
            "operationId": "followTask",
            "security": [{"bearerAuth": []}, {"subprotocolToken": []}],
            "parameters": [_TASK_ID],
            "responses": {
                "101": {
                    "description": "switching protocols; messages: TaskMessage, StreamChunk, "
                    "StreamEnd",
                    "content": {"application/json": {"schema": {"oneOf": _WS_MESSAGES}}},
                },
                **_AUTH_ERRORS,
                "404": _answer("no such task for this tenant, or expired under retention"),
                "429": _answer("the tenant has too many open WebSockets"),
                "503": _answer("the process has too many open WebSockets"),
            },
        }
    },
    "/healthz": _probe("liveness: the event loop runs", "stalled"),
    "/readyz": _probe("readiness: started and the result store answers", "not ready"),
    "/metrics": {
        "get": {
            "summary": "Prometheus exposition",
            "security": [],
            "responses": {"200": {"description": "metrics"}},
        }
    },
}


_TIME = "date-time"


@functools.cache
def _document() -> dict[str, Any]:
    task_with_timeline = copy.deepcopy(_TASK)
    task_with_timeline["properties"]["timeline"] = {
        "type": "array",
        "items": {"$ref": "#/components/schemas/TimelineEvent"},
    }
    message = copy.deepcopy(_TASK)
    message["properties"]["final"] = {"type": "boolean", "description": "terminal status"}
    accepted: dict[str, Any] = {
        "type": "object",
        "required": ["task_id", "status", "status_url", "trace_id"],
        "properties": {
            "task_id": {"type": "string"},
            "status": {"const": "pending"},
            "status_url": {
                "type": "string",
                "format": "uri-reference",
                "description": "on the configured public base URL, else a relative path",
            },
            "trace_id": _nullable("string", "null when tracing is off"),
            "estimated_start": _nullable(
                "string",
                "when inference is estimated to start the task (null while unknown)",
                format="date-time",
            ),
            "queue_position_estimate": _nullable(
                "integer", "records ahead of the task in its lane and the lanes above it"
            ),
        },
    }
    repeated = copy.deepcopy(accepted)
    for name in ("estimated_start", "queue_position_estimate"):
        del repeated["properties"][name]
    repeated["properties"]["status"] = {"enum": sorted(STATUSES)}
    cancelled: dict[str, Any] = {
        "type": "object",
        "required": ["task_id", "cancelled", "status"],
        "properties": {
            "task_id": {"type": "string"},
            "tenant": _nullable("string"),
            "cancelled": {"type": "boolean"},
            "status": {"enum": sorted(STATUSES)},
            "cancelled_at": _nullable("string", "when the cancel was recorded", format=_TIME),
            "completed_at": _nullable("string", "when the task became terminal", format=_TIME),
        },
    }
    not_cancelled = copy.deepcopy(cancelled)
    not_cancelled["properties"]["error"] = {"type": "string"}
    not_cancelled["required"].append("error")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Conveyor gateway",
            "version": "1.0.0",
            "description": "Submit AI inference tasks and follow them. Each bearer token "
            "belongs to one tenant; a tenant never sees another tenant's tasks (404).",
        },
        "security": [{"bearerAuth": []}],
        "paths": {**_PATHS, **BATCH_PATHS},
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "per-tenant token (CONVEYOR_GATEWAY_TOKENS)",
                },
                "subprotocolToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Sec-WebSocket-Protocol",
                    "description": "WebSocket only, for clients that cannot set headers "
                    "(browsers): `conveyor.v1, bearer.<base64url(token)>`",
                },
            },
            "schemas": {
                "TaskRequest": _task_request_schema(),
                "TaskAccepted": accepted,
                "TaskRepeated": repeated,
                "Cancelled": cancelled,
                "NotCancelled": not_cancelled,
                "Task": _TASK,
                "TaskWithTimeline": task_with_timeline,
                "TaskMessage": message,
                "StreamChunk": _STREAM_CHUNK,
                "StreamEnd": _STREAM_END,
                "TimelineEvent": _EVENT,
                "Error": _ERROR,
                **BATCH_SCHEMAS,
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway (a copy: callers may change it)."""
    return copy.deepcopy(_document())
