"""The batch routes' part of the gateway's OpenAPI document (`conveyor.web.schema` merges it).

Kept beside `conveyor.batches.views`, which writes the shapes described here.
"""

from __future__ import annotations

from typing import Any

from conveyor.store import STATUSES
from conveyor.store.batches import BatchStatus


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _answer(description: str, schema: str = "Error") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


_BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
_AUTH = {"401": _answer("missing or unknown bearer token")}
_NOT_FOUND = {"404": _answer("no such batch for this tenant")}
_TIME = {"type": "string", "format": "date-time"}
_NULL_TIME = {"type": ["string", "null"], "format": "date-time"}

BATCH_SCHEMAS: dict[str, Any] = {
    "Batch": {
        "type": "object",
        "required": ["id", "object", "status", "request_counts"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "batch"},
            "endpoint": {"const": "/v1/tasks"},
            "status": {"enum": sorted(BatchStatus)},
            "completion_window": {"type": "string", "examples": ["24h"]},
            "created_at": _TIME,
            "expires_at": _TIME,
            "ended_at": _NULL_TIME,
            "request_counts": {
                "type": "object",
                "description": "total, and the batch's tasks per status",
                "properties": {
                    "total": {"type": "integer"},
                    **{status: {"type": "integer"} for status in sorted(STATUSES)},
                },
            },
            "status_url": {"type": "string", "format": "uri-reference"},
            "results_url": {"type": "string", "format": "uri-reference"},
            "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
            "errors": {
                "type": ["array", "null"],
                "items": {"type": "object", "properties": {"message": {"type": "string"}}},
            },
        },
    },
    "BatchRequestLine": {
        "type": "object",
        "description": "one line of the JSONL file",
        "required": ["custom_id", "body"],
        "additionalProperties": False,
        "properties": {
            "custom_id": {"type": "string", "minLength": 1, "maxLength": 256},
            "method": {"const": "POST"},
            "url": {"const": "/v1/tasks"},
            "body": {
                "allOf": [_ref("TaskRequest")],
                "description": "a task; without task_id (the batch names its tasks); priority "
                "defaults to low; the deadline is the batch's expiry unless earlier",
            },
        },
    },
    "BatchResultLine": {
        "type": "object",
        "description": "one line of the results file, in input order",
        "properties": {
            "id": {"type": "string", "description": "the task id"},
            "custom_id": {"type": "string"},
            "status": {"enum": sorted(STATUSES)},
            "response": {
                "type": ["object", "null"],
                "description": "completed or blocked: {body: the task}",
                "properties": {"body": _ref("Task")},
            },
            "error": {
                "type": ["object", "null"],
                "description": "failed, expired or cancelled: why",
                "properties": {"code": {"type": "string"}, "message": {"type": ["string", "null"]}},
            },
        },
    },
    "BatchInvalid": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "error_count": {"type": "integer"},
            "errors": {
                "type": "array",
                "description": "the first 100 problems, by line of the file (from 1)",
                "items": {
                    "type": "object",
                    "properties": {
                        "line": {"type": "integer"},
                        "message": {"type": "string"},
                        "fields": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
    },
}

BATCH_PATHS: dict[str, Any] = {
    "/v1/batches": {
        "post": {
            "summary": "Submit a batch: a JSONL file of tasks, one BatchRequestLine per line",
            "operationId": "submitBatch",
            "parameters": [
                {
                    "name": "completion_window",
                    "in": "query",
                    "schema": {
                        "type": "string",
                        "default": "24h",
                        "pattern": "^[1-9][0-9]*[smhd]$",
                    },
                    "description": "after this, unfinished tasks end expired (at most 7d)",
                },
                {
                    "name": "metadata",
                    "in": "query",
                    "schema": {"type": "string"},
                    "description": "a JSON object of up to 16 strings, kept with the batch",
                },
            ],
            "requestBody": {
                "required": True,
                "content": {
                    media: {"schema": {"type": "string"}}
                    for media in ("application/jsonl", "application/x-ndjson")
                },
            },
            "responses": {
                "202": _answer(
                    "accepted: the batch and its tasks are stored; the gateway publishes them "
                    "at the pace of the batch_in_flight window",
                    "Batch",
                ),
                **_AUTH,
                "408": _answer("the file did not arrive within the read timeout"),
                "413": _answer("file too large"),
                "415": _answer("the body is not JSONL"),
                "422": _answer(
                    "invalid lines (listed by line), window or metadata", "BatchInvalid"
                ),
                "429": _answer("tenant over its submission rate"),
                "503": _answer("the store is unavailable: nothing was created, repeat"),
            },
        },
        "get": {
            "summary": "The caller's batches, newest first (OpenAI's list shape)",
            "operationId": "listBatches",
            "parameters": [
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                },
                {
                    "name": "after",
                    "in": "query",
                    "schema": {"type": "string"},
                    "description": "a batch id: list the batches older than it (the previous "
                    "page's last_id)",
                },
            ],
            "responses": {
                "200": {
                    "description": "{object: list, data: [Batch], first_id, last_id, has_more}",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "object": {"type": "string", "enum": ["list"]},
                                    "data": {
                                        "type": "array",
                                        "items": _ref("Batch"),
                                    },
                                    "first_id": {"type": ["string", "null"]},
                                    "last_id": {"type": ["string", "null"]},
                                    "has_more": {"type": "boolean"},
                                },
                            }
                        }
                    },
                },
                **_AUTH,
                "422": _answer("limit out of range"),
            },
        },
    },
    "/v1/batches/{batch_id}": {
        "get": {
            "summary": "A batch's status and progress counts by task status",
            "operationId": "getBatch",
            "parameters": [_BATCH_ID],
            "responses": {"200": _answer("the batch", "Batch"), **_AUTH, **_NOT_FOUND},
        }
    },
    "/v1/batches/{batch_id}/cancel": {
        "post": {
            "summary": "Cancel a batch: its unfinished tasks end cancelled",
            "operationId": "cancelBatch",
            "parameters": [_BATCH_ID],
            "responses": {
                "200": _answer("the batch (an ended batch is returned unchanged)", "Batch"),
                **_AUTH,
                **_NOT_FOUND,
            },
        }
    },
    "/v1/batches/{batch_id}/results": {
        "get": {
            "summary": "The results file: one BatchResultLine per input line, in input order",
            "operationId": "getBatchResults",
            "parameters": [_BATCH_ID],
            "responses": {
                "200": {
                    "description": "JSONL, streamed",
                    "content": {"application/jsonl": {"schema": {"type": "string"}}},
                },
                **_AUTH,
                **_NOT_FOUND,
            },
        }
    },
}
