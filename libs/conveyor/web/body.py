"""Reading a JSON request body at the edge: declared type, size, time and shape all bounded.

Only `application/json` is accepted (415 otherwise: a form or text body is a client error, not
something to guess at). The body is counted as it arrives (413 past the limit, whatever
Content-Length claims) and read under one total deadline (408 when a client trickles it, so a
slow sender cannot hold a connection and a worker for ever). Invalid JSON, and JSON nested past
Python's recursion limit, are 400, never a 500 traceback.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request

JSON_MEDIA_TYPE = "application/json"


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


async def read_json_body(request: Request, *, limit: int, timeout_s: float) -> Any:
    """The request's JSON document; raises `HTTPException` 415, 413, 408 or 400."""
    if _media_type(request.headers.get("content-type")) != JSON_MEDIA_TYPE:
        raise HTTPException(415, f"the body must be {JSON_MEDIA_TYPE}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body larger than {limit} bytes")
    try:
        async with asyncio.timeout(timeout_s):
            body = await _read_bounded(request, limit)
    except TimeoutError:
        # Connection: close, since the rest of the body may still be on its way.
        raise HTTPException(
            408, f"body not received within {timeout_s:g} s", headers={"Connection": "close"}
        ) from None
    try:
        return json.loads(body)
    except RecursionError:
        raise HTTPException(400, "body nests too deeply") from None
    except ValueError:
        raise HTTPException(400, "body is not valid JSON") from None


async def _read_bounded(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():  # counted as it arrives: Content-Length may lie
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
    return bytes(body)


async def read_body(
    request: Request, *, media_types: frozenset[str], limit: int, timeout_s: float
) -> bytes:
    """The raw body of one of `media_types`, bounded like `read_json_body` (415, 413, 408)."""
    if _media_type(request.headers.get("content-type")) not in media_types:
        raise HTTPException(415, f"the body must be one of {', '.join(sorted(media_types))}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body larger than {limit} bytes")
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_bounded(request, limit)
    except TimeoutError:
        raise HTTPException(
            408, f"body not received within {timeout_s:g} s", headers={"Connection": "close"}
        ) from None
