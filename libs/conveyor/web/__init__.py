"""HTTP building blocks for Conveyor's ASGI front ends: bearer-token auth and request metrics."""
