"""Dead-letter tooling: read, filter, show and redrive dead letters; replay a stage's input.

`records` holds the pure parts (what a dead letter says, filters, times, redrive headers) so they
have unit tests; `reader` reads bounded ranges of topics; `ledger` remembers what was redriven;
`redrive` and `replay` are the operations behind `conveyor dlq` and `conveyor replay`.
"""
