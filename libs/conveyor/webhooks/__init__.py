"""Conveyor's webhooks: Standard Webhooks signatures, and the receiver's verifier.

A receiver checks each webhook before acting on it::

    from conveyor.webhooks import verify, WebhookVerificationError

    try:
        summary = verify(raw_body, request_headers, "whsec_...")  # the tenant's secret
    except WebhookVerificationError:
        ...  # answer 400 and do nothing

`verify` refuses webhooks whose timestamp is outside the replay window (5 minutes by default).
The sending side (destination policy, bounded delivery) lives in `policy` and `sender`, which
notify imports; this package's top level needs only the standard library.
"""

from __future__ import annotations

from conveyor.webhooks.signing import (
    DEFAULT_TOLERANCE_S,
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SecretFormatError,
    WebhookVerificationError,
    new_secret,
    secret_key,
    sign,
    verify,
)

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "SecretFormatError",
    "WebhookVerificationError",
    "new_secret",
    "secret_key",
    "sign",
    "verify",
]
