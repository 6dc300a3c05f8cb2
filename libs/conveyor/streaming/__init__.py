"""Streamed generation: partial text of a generate task pushed to its WebSocket as it is made.

Inference gates each chunk of partial text through the moderation policy (`gate`) and
publishes it as a `conveyor.task.chunk.v1` progress event (`chunks`, `publisher`) on
`conveyor.task.stream`, a short-retention topic outside the stage pipeline: nothing stores it,
and no stage consumes it. Every gateway replica reads the whole topic (`feed`) into a bounded
in-memory view of the streams in progress (`hub`), so whichever replica holds a task's
WebSocket pushes its chunks, and a socket opened mid-stream first gets the text so far.
The design and its reasons: docs/streaming.md.
"""
