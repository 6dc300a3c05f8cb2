"""writeback: record every task's state and timeline in the result store; emit `stored`.

Consumes the stage topics (`preprocessed`, `inferred`, `moderated`) and the status topic
(`retrying`, `failed`, `expired`). Each event is applied once (its CloudEvent id is the key of
the timeline row), so redelivery never yields a duplicate row. A terminal event (moderated,
failed, expired) emits `conveyor.task.stored.v1` for notify. Failures of the notify stage are
not task failures (the result is already stored): they stay in notify's dead-letter topic.
"""
