"""Tracing, metrics and logging. Telemetry is a side effect that never fails the pipeline."""
