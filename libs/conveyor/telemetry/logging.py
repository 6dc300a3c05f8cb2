"""Structured logs: one line per record outcome, with trace id and task id, never payloads.

`CONVEYOR_LOG_FORMAT=json` writes one JSON object per line (for log shippers); the default is
`key=value` text. `CONVEYOR_LOG_LEVEL` sets the level (INFO by default). A line written while a
span is current (inside a handler) gets that span's `trace_id` appended, unless it names one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from conveyor.telemetry.tracing import current_trace_id


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id = current_trace_id()
        if trace_id:
            doc["trace_id"] = trace_id
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class TextFormatter(logging.Formatter):
    """`key=value` lines; handler lines get the current trace id so they join their record's."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if "trace_id=" in line:
            return line
        trace_id = current_trace_id()
        return f"{line} trace_id={trace_id}" if trace_id else line


def setup_logging(service: str) -> None:
    level = os.environ.get("CONVEYOR_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("CONVEYOR_LOG_FORMAT", "text") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter(f"%(asctime)s %(levelname)s {service} %(name)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # librdkafka and HTTP clients are chatty at INFO.
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
