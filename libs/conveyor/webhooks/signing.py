"""Webhook signatures to the Standard Webhooks scheme: sign on the sender, verify on the receiver.

The signed content is `<webhook-id>.<webhook-timestamp>.<body>`; the signature is the base64
HMAC-SHA256 of it with the secret's bytes, sent as `v1,<base64>` in `webhook-signature`. During a
key rotation the sender signs with every current secret and sends the signatures space-separated;
a receiver accepts the webhook if any one matches a secret it holds. Secrets are written
`whsec_<base64 of 24..64 random bytes>`. The timestamp (Unix seconds) bounds replay: `verify`
refuses a webhook older or newer than its tolerance (5 minutes by default, as the reference
libraries do), so a captured webhook cannot be replayed later.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"
VERSION = "v1"
# The Standard Webhooks specification asks for secrets of 24 to 64 bytes.
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
# Replay window: a webhook's timestamp may differ from the receiver's clock by at most this.
DEFAULT_TOLERANCE_S = 300.0


class WebhookVerificationError(Exception):
    """The webhook is not authentic: missing or malformed headers, a stale or future timestamp,
    or no signature that matches any of the receiver's secrets."""


class SecretFormatError(ValueError):
    """A webhook secret is not `whsec_` + base64 of 24..64 bytes (the secret is never echoed)."""


def new_secret(size: int = 32) -> str:
    """A fresh random secret in the `whsec_` form."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(size)).decode()


def secret_key(secret: str | bytes) -> bytes:
    """The HMAC key a secret stands for: `whsec_<base64>` decoded, or raw bytes as they are."""
    if isinstance(secret, bytes):
        key = secret
    else:
        if not secret.startswith(SECRET_PREFIX):
            raise SecretFormatError("a webhook secret must start with 'whsec_'")
        try:
            key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise SecretFormatError("a webhook secret must be whsec_ + base64") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise SecretFormatError(
            f"a webhook secret must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, "
            f"not {len(key)}"
        )
    return key


def signature(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of `body` with `key`."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return f"{VERSION},{base64.b64encode(digest).decode()}"


def sign(
    keys: Sequence[bytes], webhook_id: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers for `body`, signed with every key (rotation)."""
    if not keys:
        raise ValueError("at least one key is needed to sign a webhook")
    at = int(time.time()) if timestamp is None else timestamp
    return {
        ID_HEADER: webhook_id,
        TIMESTAMP_HEADER: str(at),
        SIGNATURE_HEADER: " ".join(signature(key, webhook_id, at, body) for key in keys),
    }


def verify(
    body: bytes | str,
    headers: Mapping[str, str],
    secret: str | bytes | Iterable[str | bytes],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> Any:
    """Check a received webhook and return its JSON body; raise `WebhookVerificationError`.

    `body` is the raw request body, exactly as received (verify before parsing). `headers` is
    the request's headers (any case). `secret` is the tenant's `whsec_...` secret, or several
    while a rotation is under way. The webhook's timestamp must lie within `tolerance_s` of
    `now` (the receiver's clock); keep the `webhook-id`s seen within that window to drop a
    webhook delivered twice.
    """
    raw = body.encode() if isinstance(body, str) else body
    lower = {k.lower(): v for k, v in headers.items()}
    webhook_id = lower.get(ID_HEADER, "")
    stamp = lower.get(TIMESTAMP_HEADER, "")
    offered = lower.get(SIGNATURE_HEADER, "")
    if not (webhook_id and stamp and offered):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:
        raise WebhookVerificationError("webhook-timestamp is not a Unix time in seconds")
    at = int(stamp)
    clock = time.time() if now is None else now
    if at < clock - tolerance_s:
        raise WebhookVerificationError("webhook timestamp is too old (replay window passed)")
    if at > clock + tolerance_s:
        raise WebhookVerificationError("webhook timestamp is too far in the future")
    secrets_ = [secret] if isinstance(secret, (str, bytes)) else list(secret)
    try:
        keys = [secret_key(s) for s in secrets_]
    except SecretFormatError as exc:
        raise WebhookVerificationError(f"receiver secret unusable: {exc}") from None
    candidates = [s.partition(",") for s in offered.split(" ")]
    for key in keys:
        expected = signature(key, webhook_id, at, raw).encode()
        for version, _, value in candidates:
            given = f"{VERSION},{value}".encode("utf-8", "replace")
            if version == VERSION and hmac.compare_digest(expected, given):
                return _json(raw)
    raise WebhookVerificationError("no webhook-signature matches the secret")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise WebhookVerificationError("the signed body is not JSON") from None
