"""Conveyor: asynchronous AI inference tasks as a Kafka event-driven pipeline.

`conveyor` is the shared runtime every stage service runs on. It is the only code that touches
Kafka, OpenTelemetry and Prometheus; services under `services/` hold their business logic only.
"""

from __future__ import annotations

__version__ = "0.1.0"
