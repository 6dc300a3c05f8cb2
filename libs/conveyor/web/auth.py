"""Bearer tokens mapped to tenants, checked in constant time.

A token table is `{token: tenant}` (the gateway reads it from `CONVEYOR_GATEWAY_TOKENS`). Only
SHA-256 digests of the tokens are kept, and a lookup compares the presented token's digest with
every entry using `hmac.compare_digest`, without stopping at the first match, so the time taken
says nothing about how much of a token was right or which entry matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

BEARER = "bearer "


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class TokenTable:
    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._entries = [(_digest(token), tenant) for token, tenant in tokens.items() if token]

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
