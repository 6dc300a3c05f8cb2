"""Batch jobs: many tasks submitted as one JSONL file, followed, cancelled and collected as one.

The shape is the OpenAI Batch API's (input lines with `custom_id`, a batch object with `status`,
`request_counts` and `completion_window`, a results file in input order): `jsonl` reads and checks
the input, `lifecycle` creates, refreshes, cancels and expires batches over the store, `views`
writes the batch object and the result lines. The HTTP routes and the paced dispatcher are in
`conveyor.services.gateway.batches`, the dispatch claims in `conveyor.store.dispatch`;
docs/batches.md.
"""
