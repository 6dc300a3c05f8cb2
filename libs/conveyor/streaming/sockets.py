"""A task WebSocket's partial text: pushed between the status polls (docs/streaming.md).

The socket's loop polls the store every `ws_poll_s` for status changes; in between it waits on
the task's `Subscription` and pushes each new piece of partial text as soon as the stream feed
delivers it. Pending partial text is also pushed just before each status message, so a
reader always has the partial text before the final result that supersedes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket

from conveyor.streaming.chunks import Chunk
from conveyor.streaming.feed import StreamFeed
from conveyor.streaming.hub import StreamHub, Subscription

log = logging.getLogger(__name__)


async def push_partial(ws: WebSocket, stream: Subscription | None) -> None:
    """Send what the socket has not been told of the task's stream yet."""
    if stream is None:
        return
    for message in stream.messages():
        await ws.send_json(message)


async def pause(
    ws: WebSocket, left: asyncio.Future[Any], stream: Subscription | None, seconds: float
) -> bool:
    """Wait `seconds`, pushing partial text as it comes; True when the client left."""
    until = time.monotonic() + seconds
    while (remaining := until - time.monotonic()) > 0:
        waiters: set[asyncio.Future[Any]] = {left}
        if stream is not None:
            waiters.add(asyncio.ensure_future(stream.changed.wait()))
        done, pending = await asyncio.wait(
            waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
        )
        for waiter in pending - {left}:
            waiter.cancel()
        if left in done:
            return True
        await push_partial(ws, stream)
    return False


async def start_feed(feed: StreamFeed, hub: StreamHub) -> None:
    """Start reading the stream topic; its chunks reach `hub` on this event loop's thread."""
    loop = asyncio.get_running_loop()

    def deliver(chunks: list[Chunk]) -> None:
        loop.call_soon_threadsafe(hub.apply, chunks)

    if not await run_in_threadpool(feed.start, deliver):
        log.warning("stream topic not assigned yet; partial text follows once it is")
