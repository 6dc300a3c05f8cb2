"""notify: tell the caller a task is done, once: a signed webhook to its `callback_url`.

Consumes `conveyor.task.stored.v1` (completed, blocked, failed, expired); emits
`conveyor.task.notified.v1`. The body is a JSON result summary; `X-Conveyor-Signature` is
`sha256=<hex HMAC-SHA256 of the body with the tenant's secret>`. A task is notified at most once:
the store's notification claim (keyed by task id) is taken before sending. 5xx, 429 and
timeouts retry through the ladder (the claim is released); other 4xx dead-letter. A claim left
unfinished by a sender that died is retried until its lease lapses, then taken over and sent:
a crash between the receiver's answer and the claim's completion repeats the webhook, with the
same `X-Conveyor-Event-Id`, body and signature, for the receiver to drop.
WebSocket push is the gateway's (it follows the status and stored topics).
"""
