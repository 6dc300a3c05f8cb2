"""notify: tell the caller a task is done, once: a signed webhook to its `callback_url`.

Consumes `conveyor.task.stored.v1` (completed, blocked, failed, expired); emits
`conveyor.task.notified.v1`. The body is a JSON result summary, signed to the Standard Webhooks
scheme with the tenant's own secret (`webhook-id` = the stored event's id, `webhook-timestamp`,
`webhook-signature`: `v1,<base64>`, one per secret during a rotation). Destinations pass the
SSRF policy (`conveyor.webhooks.policy`); a batch's webhooks go out concurrently, each within
one deadline, and only a few KiB of an answer are read. A task is notified at most once: the
store's notification claim (keyed by task id) is taken before sending. 5xx, 429, timeouts and
unreachable receivers retry through the ladder (the claim is released); a refused destination,
a redirect (not followed), other 4xx and a tenant without a secret dead-letter. A claim left
unfinished by a sender that died is retried until its lease lapses, then taken over and sent:
a crash between the receiver's answer and the claim's completion repeats the webhook with the
same `webhook-id` and body (and a fresh timestamp and signature), for the receiver to drop.
WebSocket push is the gateway's (it follows the status and stored topics).
"""
