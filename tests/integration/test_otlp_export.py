"""OTLP export configured only by the standard OTEL_* variables, over HTTP and over gRPC.

Each case runs a fresh Python process (the SDK installs a process-wide provider) that calls
`init_tracing`, makes a span with a handler span inside, and shuts tracing down; the spans must
arrive at `conveyor.local.otlp.OtlpReceiver` with the service name and parentage intact.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from conveyor.local.otlp import OtlpReceiver

PROBE = """
from conveyor.telemetry import tracing
assert tracing.init_tracing("probe"), "tracing did not switch on"
with tracing.span("process probe", {"messaging.system": "kafka"}):
    with tracing.span("tokenise"):
        pass
tracing.shutdown_tracing()
"""


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver(grpc=True) as otlp:
        yield otlp


def run_probe(env: dict[str, str]) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_spans_reach_the_collector_over_each_otlp_protocol(
    receiver: OtlpReceiver, protocol: str
) -> None:
    endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.endpoint
    service = f"probe-{protocol.replace('/', '-')}"
    run_probe(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_SERVICE_NAME": service,
        }
    )
    spans = [s for s in receiver.spans() if s.service == service]
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"process probe", "tokenise"}
    assert by_name["tokenise"].parent_span_id == by_name["process probe"].span_id
    assert by_name["process probe"].attributes["messaging.system"] == "kafka"


def test_traces_endpoint_variable_and_default_service_name(receiver: OtlpReceiver) -> None:
    run_probe({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint + "/v1/traces"})
    assert any(s.service == "conveyor-probe" for s in receiver.spans())


def test_sdk_disabled_exports_nothing(receiver: OtlpReceiver) -> None:
    before = receiver.span_count
    code = PROBE.replace(
        'assert tracing.init_tracing("probe"), "tracing did not switch on"',
        'assert not tracing.init_tracing("probe")',
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={
            **clean,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_SDK_DISABLED": "true",
        },
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert receiver.span_count == before
