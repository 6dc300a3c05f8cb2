"""The stage runtime: decode → handle → emit → wait for acks → commit, with retries and DLQ.

Services import what they need from here: `StageService`, `Emit`, `StageContext`, `run_service`.
"""

from __future__ import annotations

from conveyor.runtime.handler import Emit, StageContext, StageService

__all__ = ["Emit", "StageContext", "StageService"]
