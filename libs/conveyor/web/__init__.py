"""HTTP building blocks for Conveyor's ASGI front ends: bearer-token auth, request metrics, and the
gateway's API shapes (`schema`)."""
