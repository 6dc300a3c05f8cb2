"""A logging filter that keeps credentials out of every log line, at every level.

The gateway never logs a token itself, but libraries do at DEBUG (the WebSocket server prints
handshake headers, an access log prints URLs). Installed on the process's log handlers, this
filter rewrites each record's final text: known secrets (and their WebSocket subprotocol form)
become `***`, and so does whatever follows `Authorization:`, `Bearer`, `token=` or `bearer.`,
known or not. It costs one pass of a few regular expressions over a formatted line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from conveyor.web.auth import token_subprotocol

MASK = "***"
_PATTERNS = (
    re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(?:bearer\s+|basic\s+)?[^\s,;\"']+"),
    re.compile(r"(?i)(bearer\s+)[^\s,;\"']+"),
    re.compile(r"(?i)([?&](?:access_)?token=)[^\s&#\"']+"),
    re.compile(r"(bearer\.)[A-Za-z0-9_\-]+"),
)


class RedactingFilter(logging.Filter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        forms = set()
        for secret in secrets:
            if len(secret) >= 4:  # shorter strings would mask ordinary words
                forms.update({secret, token_subprotocol(secret)})
        # Longest first, so a token that contains another is masked whole.
        self._secrets = sorted(forms, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        for pattern in _PATTERNS:
            text = pattern.sub(lambda m: m.group(1) + MASK, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the formatter to report
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install(secrets: Iterable[str] = ()) -> RedactingFilter:
    """Attach a redacting filter to every handler of the root logger (where all records end)."""
    redactor = RedactingFilter(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(redactor)
    return redactor
