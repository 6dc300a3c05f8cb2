"""Inference's runtime mode: pipelined with fair share by default; the plain loop when fair share
is not in effect (off, or exactly-once), unless CONVEYOR_PIPELINED says otherwise."""

from __future__ import annotations

import pytest

from conveyor.services.inference.settings import InferenceSettings


@pytest.mark.parametrize(
    ("env", "pipelined"),
    [
        ({}, True),
        ({"CONVEYOR_FAIR_SHARE": "false"}, False),
        ({"CONVEYOR_EXACTLY_ONCE": "true"}, False),
        ({"CONVEYOR_FAIR_SHARE": "false", "CONVEYOR_PIPELINED": "true"}, True),
        ({"CONVEYOR_PIPELINED": "false"}, False),
    ],
)
def test_inference_is_pipelined_exactly_when_fair_share_is_in_effect_unless_told(
    env: dict[str, str], pipelined: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = InferenceSettings(stage="inference")
    assert settings.pipelined is pipelined
    assert settings.fair_share is ("CONVEYOR_FAIR_SHARE" not in env)
