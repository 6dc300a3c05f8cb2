"""gateway: the HTTP/WebSocket API over the pipeline.

Consumes nothing from the stage topics. `POST /v1/tasks` validates a task and publishes it to
`conveyor.task.submitted` (as `conveyor submit` does); `GET /v1/tasks/{id}` and
`WS /v1/tasks/{id}/events` read the result store that writeback fills; the queue position estimate
is the preprocess group's lag on the ingress topic. Bearer tokens map to tenants.
"""
