"""Bearer tokens mapped to tenants, checked in constant time, and how a request presents one.

A token table is `{token: tenant}` (the gateway reads it from `CONVEYOR_GATEWAY_TOKENS`). Only
SHA-256 digests of the tokens are kept, and a lookup compares the presented token's digest with
every entry using `hmac.compare_digest`, without stopping at the first match, so the time taken
says nothing about how much of a token was right or which entry matched.

HTTP requests carry `Authorization: Bearer <token>`. A WebSocket may too, but browsers cannot set
headers on one, so it may instead offer two subprotocols, `conveyor.v1` and
`bearer.<token as base64url, no padding>` (the scheme Kubernetes uses); the server selects
`conveyor.v1`, never echoing the token. A token in the URL is never accepted: URLs end up in
access logs, proxies and browser history.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping

from pydantic import SecretStr

BEARER = "bearer "
SUBPROTOCOL = "conveyor.v1"
TOKEN_SUBPROTOCOL_PREFIX = "bearer."


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _text(token: str | SecretStr) -> str:
    return token.get_secret_value() if isinstance(token, SecretStr) else token


class TokenTable:
    def __init__(self, tokens: Mapping[str, str] | Mapping[SecretStr, str]) -> None:
        self._entries = [
            (_digest(_text(token)), tenant) for token, tenant in tokens.items() if _text(token)
        ]

    def __len__(self) -> int:
        return len(self._entries)

    def tenant_for(self, token: str | None) -> str | None:
        """The tenant owning `token`, or None for a missing or unknown token."""
        if not token:
            return None
        digest = _digest(token)
        found = None
        for known, tenant in self._entries:
            if hmac.compare_digest(known, digest):
                found = tenant
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, else None."""
    if not authorization or authorization[: len(BEARER)].lower() != BEARER:
        return None
    return authorization[len(BEARER) :].strip() or None


def offered_subprotocols(header: str | None) -> list[str]:
    return [p.strip() for p in (header or "").split(",") if p.strip()]


def subprotocol_token(offered: list[str]) -> str | None:
    """The token a WebSocket client offered as `bearer.<base64url>`, else None."""
    for protocol in offered:
        if protocol.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            encoded = protocol[len(TOKEN_SUBPROTOCOL_PREFIX) :]
            try:
                raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
                return raw.decode("utf-8") or None
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return None
    return None


def token_subprotocol(token: str) -> str:
    """What a client offers to authenticate a WebSocket: `bearer.<base64url(token)>`."""
    encoded = base64.urlsafe_b64encode(token.encode("utf-8")).decode("ascii").rstrip("=")
    return TOKEN_SUBPROTOCOL_PREFIX + encoded
