"""moderation: score a task's input and output with a policy of signals → allow | flag | block.

Consumes `conveyor.task.inferred.v1`; emits `conveyor.task.moderated.v1` with the verdict, each
signal's score and the reasons. Blocked output is withheld: the moderated event carries no text,
so neither the store nor any notification ever sees it.
"""
