"""inference: run each task's model in dynamic batches (GPU when present).

Consumes `conveyor.task.preprocessed.v1` from the lanes `conveyor.task.preprocessed.<lane>`.
Emits `conveyor.task.inferred.v1`, or a `conveyor.task.status.v1` event `expired` for a task
past its deadline (it is not run). Records of one poll batch are grouped by (kind, model): one
generate / embed / classify call per group. A task with shadow variants also emits one
inferred event per shadow copy (extension `shadow`), or a `failed` status of the copy.
"""
