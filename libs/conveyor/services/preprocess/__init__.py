"""preprocess: validate, normalise and template a submitted task, count its tokens, pick a lane.

Consumes `conveyor.task.submitted.v1` (JSON or Avro; structured or binary mode).
Emits `conveyor.task.preprocessed.v1` on `conveyor.task.preprocessed.<lane>` (high|normal|low).
Invalid input (schema, empty or over-long text, unknown template) is a permanent error.
"""
