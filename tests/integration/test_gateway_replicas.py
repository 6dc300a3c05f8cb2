"""Task ids are per tenant and reserved atomically: two real gateway processes on one store and
broker, with the real preprocess and writeback services behind them, take concurrent POSTs.

The same id from two tenants is two tasks (two ingress records, two store rows, distinct event
ids downstream); the same submission repeated by one tenant on both replicas at once is
published exactly once (one 202, one 200); another body under a taken id is 409.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conveyor.events.avro import default_schemas
from conveyor.events.catalog import INGRESS_TOPIC, LANES
from conveyor.events.codec import decode
from conveyor.local.process import ServiceProcess
from conveyor.net import free_ports
from conveyor.store import ResultStore, TaskRecord, open_store
from tests.integration.test_gateway import wait_for
from tests.support import apply, read_topics

pytestmark = pytest.mark.timeout(300)

TOKENS = '{"tok-acme": "acme", "tok-beta": "beta"}'
HEADERS = {tenant: {"Authorization": f"Bearer tok-{tenant}"} for tenant in ("acme", "beta")}
IDS = [f"dup-{n}" for n in range(6)]


@pytest.fixture
def cluster(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> Iterator[tuple[list[str], str]]:
    """Two gateway replicas, preprocess and writeback, sharing one SQLite store."""
    apply(kafka_bootstrap, topic_prefix, partitions=2)
    store_url = f"sqlite:///{tmp_path / 'conveyor.db'}"
    common = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_STORE_URL": store_url,
        "OTEL_SDK_DISABLED": "true",
    }
    ports = free_ports(2)
    processes = [
        ServiceProcess(
            "gateway",
            {
                **common,
                "CONVEYOR_GATEWAY_PORT": str(port),
                "CONVEYOR_GATEWAY_TOKENS": TOKENS,
                # The broker is shared with other test runs on two cores.
                "CONVEYOR_PUBLISH_TIMEOUT_S": "30",
            },
            tmp_path,
            index=n,
        )
        for n, port in enumerate(ports)
    ]
    processes.append(
        ServiceProcess("preprocess", {**common, "CONVEYOR_TOKENIZERS": "false"}, tmp_path)
    )
    processes.append(ServiceProcess("writeback", common, tmp_path))
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.wait_ready(120)
        yield [f"http://127.0.0.1:{port}" for port in ports], store_url
    finally:
        codes = {p.label: p.stop(30) for p in processes}
    assert all(code == 0 for code in codes.values()), codes


def post(base: str, tenant: str, body: dict[str, str]) -> int:
    with httpx.Client(base_url=base, timeout=60) as http:
        return http.post("/v1/tasks", json=body, headers=HEADERS[tenant]).status_code


def test_equal_ids_are_per_tenant_and_a_repeat_across_replicas_is_published_once(
    cluster: tuple[list[str], str], kafka_bootstrap: str, topic_prefix: str
) -> None:
    replicas, store_url = cluster
    # Every (tenant, id) is POSTed to both replicas at once: 24 concurrent requests.
    calls = [
        (base, tenant, {"task_id": task_id, "kind": "embed", "input": f"{tenant} {task_id}"})
        for task_id in IDS
        for tenant in ("acme", "beta")
        for base in replicas
    ]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        codes = list(pool.map(lambda call: post(*call), calls))
    answers: dict[tuple[str, str], list[int]] = {}
    for (_, tenant, body), code in zip(calls, codes, strict=True):
        answers.setdefault((tenant, body["task_id"]), []).append(code)
    assert all(sorted(c) == [200, 202] for c in answers.values()), answers

    ingress = read_topics(
        kafka_bootstrap, [topic_prefix + INGRESS_TOPIC], expect=len(answers), settle_s=2.0
    )
    schemas = default_schemas()
    submitted = Counter(
        (event.extensions["tenant"], event.subject)
        for event in (decode(m.headers() or [], m.value(), schemas) for m in ingress)  # type: ignore[arg-type]
    )
    assert submitted == Counter(answers.keys()), submitted  # each task published exactly once

    lanes = [f"{topic_prefix}conveyor.task.preprocessed.{lane}" for lane in LANES]
    preprocessed = [
        decode(m.headers() or [], m.value(), schemas)  # type: ignore[arg-type]
        for m in read_topics(kafka_bootstrap, lanes, expect=len(answers), settle_s=2.0)
    ]
    assert Counter((e.extensions["tenant"], e.subject) for e in preprocessed) == submitted
    assert len({e.id for e in preprocessed}) == len(answers)  # equal ids, distinct event ids

    store = open_store(store_url)
    try:
        for task_id in IDS:
            rows = {
                tenant: wait_for(
                    lambda t=tenant, i=task_id: _processed(store, i, t),
                    f"writeback to record {tenant}'s {task_id}",
                    timeout_s=120,
                )
                for tenant in ("acme", "beta")
            }
            acme, beta = rows["acme"], rows["beta"]
            assert (acme.tenant, beta.tenant) == ("acme", "beta")
            acme_events = {e.event_id for e in store.timeline(task_id, tenant="acme")}
            beta_events = {e.event_id for e in store.timeline(task_id, tenant="beta")}
            assert acme_events and beta_events and not acme_events & beta_events
        counts = store.count_by_status()
        assert counts["pending"] == 0 and counts["processing"] == len(answers), counts
    finally:
        store.close()

    # Another body under a taken id is 409 on either replica; the tenant's own view is its task.
    for base in replicas:
        taken = {"task_id": IDS[0], "kind": "embed", "input": "something else"}
        assert post(base, "acme", taken) == 409
        with httpx.Client(base_url=base, timeout=60) as http:
            for tenant in ("acme", "beta"):
                view = http.get(f"/v1/tasks/{IDS[0]}", headers=HEADERS[tenant]).json()
                assert (view["tenant"], view["status"]) == (tenant, "processing")


def _processed(store: ResultStore, task_id: str, tenant: str) -> TaskRecord | None:
    row = store.get(task_id, tenant=tenant)
    return row if row is not None and row.status == "processing" else None
