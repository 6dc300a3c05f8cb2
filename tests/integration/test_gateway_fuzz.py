"""Property-based API test against the real gateway (uvicorn on 127.0.0.1, the real broker): over
5,000 generated requests, none is answered with a 5xx.

Two generators share the run. Schemathesis reads the gateway's served OpenAPI document and
generates schema-conforming and schema-violating requests for every operation (a few hundred:
its generation costs tens of ms per case on two busy cores). Hypothesis then drives the bulk,
5,000 requests in batches of ten, from strategies aimed at the edge: near-valid tasks with
boundary and wrong-typed values in every field and parameter, NaN and huge numbers, deep
nesting, raw garbage bytes, every content type, valid/invalid/missing tokens, odd task ids and
paths, and methods a route does not serve. A 503 counts as a failure too: the broker is up.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.integration.test_gateway import (
    Running,
    gateway,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.timeout(300)

BATCH = 10
BATCHES = int(os.environ.get("CONVEYOR_FUZZ_BATCHES", "500"))  # 5,000 requests + schemathesis
TOKENS = ["Bearer tok-acme", "Bearer tok-beta", "Bearer wrong", "Basic tok-acme", "", "Bearer"]
# No shrinking: each step would replay requests against the server, and the run must stay
# bounded; a failure prints the whole unshrunk batch, and the assertion names the request.
SETTINGS = settings(
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)

# -- values aimed at the edge ---------------------------------------------------------------

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 4096, 4097, 2**63 - 1, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.009, 0.01, 100.0, 100.1, 1e30, 1e-300]),
)
texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "embed", "generate", "classify", "plain", "answer", "smollm2"]),
    st.sampled_from(["1e30", "NaN", "inf", "true", "TRUE", "7", "-1", "0.5", "\x00", "é" * 70]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=4)
deadlines = st.one_of(
    st.datetimes().map(lambda d: d.isoformat()),
    st.sampled_from(["2020-01-01T00:00:00Z", "9999-12-31T23:59:59-14:00", "0001-01-01", "now"]),
    numbers,
)
param_names = st.sampled_from(
    ["max_new_tokens", "do_sample", "temperature", "top_p", "seed", "labels", "colour", ""]
)
FIELDS = {
    "input": st.one_of(texts, junk),
    "task_id": st.one_of(st.none(), st.uuids().map(str), texts, junk),
    "tenant": st.one_of(st.none(), st.sampled_from(["acme", "beta"]), junk),
    "template": st.one_of(st.none(), texts),
    "model": st.one_of(st.none(), texts),
    "priority": st.one_of(st.sampled_from(["high", "normal", "low"]), junk),
    "callback_url": st.one_of(st.none(), st.just("https://example.com/h"), texts),
    "deadline": st.one_of(st.none(), deadlines),
    "labels": st.one_of(st.lists(texts, max_size=3), st.just(["x"] * 65), junk),
    "params": st.one_of(st.dictionaries(param_names, scalars, max_size=4), junk),
    "extra": junk,
}
kinds = st.sampled_from(["embed", "generate", "classify"])
wild_tasks = st.fixed_dictionaries({"kind": st.one_of(kinds, junk)}, optional=FIELDS)
# A valid task with one field or parameter replaced: most land on a boundary of the contract.
near_valid_tasks = st.builds(
    lambda kind, change: {"kind": kind, "input": "hello", "labels": ["a", "b"], **dict([change])},
    kinds,
    st.one_of(
        *(st.tuples(st.just(name), strategy) for name, strategy in FIELDS.items()),
        st.tuples(st.just("params"), st.dictionaries(param_names, numbers, max_size=1)),
    ),
)
tasks = st.one_of(wild_tasks, near_valid_tasks)


def nested(depth: int) -> bytes:
    return b'{"kind": "embed", "input": "x", "params": ' + b"[" * depth + b"]" * depth + b"}"


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=5_000).map(nested),
    st.sampled_from([b"", b"null", b"[]", b'"x"', b"{", b'{"kind": NaN}', b"\xff\xfe{}"]),
)
content_types = st.sampled_from(
    [
        *["application/json"] * 6,  # mostly JSON: reach the validation behind the media type
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
    ]
)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    auth = draw(st.sampled_from([*TOKENS[:2], *TOKENS]))  # mostly valid: reach the validation
    headers = {"Authorization": auth} if auth else {}
    shape = draw(st.sampled_from(["task", "task", "task", "raw", "get", "method", "path"]))
    if shape == "task":
        body = json.dumps(draw(tasks), allow_nan=True).encode()
        return post(headers, body, draw(content_types))
    if shape == "raw":
        return post(headers, draw(raw_bodies), draw(content_types))
    task_id = quote(draw(st.one_of(texts, st.uuids().map(str))), safe="") or "x"
    if shape == "get":
        path = draw(st.sampled_from(["/v1/tasks/{}", "/v1/tasks/{}/events"])).format(task_id)
        return {"method": "GET", "url": path, "headers": headers}
    if shape == "method":
        method = draw(st.sampled_from(["PUT", "DELETE", "PATCH", "GET", "HEAD", "OPTIONS"]))
        return {"method": method, "url": draw(st.sampled_from(["/v1/tasks", "/openapi.json"]))}
    return {"method": "GET", "url": "/" + task_id, "headers": headers}


def post(headers: dict[str, str], body: bytes, content_type: str) -> dict[str, Any]:
    if content_type:
        headers = {**headers, "Content-Type": content_type}
    return {"method": "POST", "url": "/v1/tasks", "headers": headers, "content": body}


def check(response: httpx.Response, request: dict[str, Any]) -> None:
    shown = {**request, "content": request.get("content", b"")[:300]}
    assert response.status_code < 500, (response.status_code, response.text[:300], shown)
    answered = request["method"] in ("GET", "POST") and request["url"].startswith("/v1/tasks")
    if response.status_code >= 400 and answered:
        assert response.json()["error"], shown  # every refusal says why, as JSON


# -- the tests ------------------------------------------------------------------------------


def test_five_thousand_generated_requests_get_no_5xx(gateway: Running) -> None:  # noqa: F811
    counted = {"requests": 0}
    codes: dict[int, int] = {}
    started = time.monotonic()
    with httpx.Client(base_url=gateway.url, timeout=60) as http:

        @settings(SETTINGS, max_examples=BATCHES)
        @given(st.lists(requests(), min_size=BATCH, max_size=BATCH))
        def run(batch: list[dict[str, Any]]) -> None:
            for request in batch:
                response = http.request(**request)
                counted["requests"] += 1
                codes[response.status_code] = codes.get(response.status_code, 0) + 1
                check(response, request)

        run()
    elapsed = time.monotonic() - started
    print(f"{counted['requests']} requests in {elapsed:.0f} s, codes {sorted(codes.items())}")
    assert counted["requests"] >= BATCH * BATCHES
    # The generators reach every outcome, not just the first refusal.
    assert {202, 400, 401, 403, 404, 405, 415, 422} <= set(codes), codes


# A batch file is JSONL, which schemathesis does not write by itself: a few lines, each a
# request of the right shape with generated values, or any JSON, or any text.
_BATCH_LINE = st.one_of(
    st.fixed_dictionaries(
        {"custom_id": st.text(max_size=8), "body": st.dictionaries(st.text(max_size=6), st.text())}
    ).map(json.dumps),
    st.from_type(dict).map(lambda value: json.dumps(value, default=str)),
    st.text(max_size=40),
)
for _media in ("application/jsonl", "application/x-ndjson"):
    schemathesis.openapi.media_type(
        _media, st.lists(_BATCH_LINE, max_size=4).map(lambda lines: "\n".join(lines).encode())
    )

OPERATIONS = [
    ("/v1/tasks", "POST", GenerationMode.POSITIVE, 100),
    ("/v1/tasks", "POST", GenerationMode.NEGATIVE, 50),
    ("/v1/tasks/{task_id}", "GET", GenerationMode.POSITIVE, 30),
    ("/v1/tasks/{task_id}", "GET", GenerationMode.NEGATIVE, 10),
    ("/v1/tasks/{task_id}/events", "GET", GenerationMode.POSITIVE, 10),
    ("/v1/batches", "POST", GenerationMode.POSITIVE, 20),
    ("/v1/batches", "POST", GenerationMode.NEGATIVE, 20),
    ("/v1/batches/{batch_id}", "GET", GenerationMode.POSITIVE, 10),
    ("/v1/batches/{batch_id}/cancel", "POST", GenerationMode.POSITIVE, 10),
    ("/v1/batches/{batch_id}/results", "GET", GenerationMode.POSITIVE, 10),
    ("/healthz", "GET", GenerationMode.POSITIVE, 5),
    ("/readyz", "GET", GenerationMode.POSITIVE, 5),
    ("/metrics", "GET", GenerationMode.POSITIVE, 5),
]


def test_schemathesis_cases_from_the_served_openapi_document_get_no_5xx(
    gateway: Running,  # noqa: F811
) -> None:
    document = httpx.get(f"{gateway.url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    calls = 0
    for path, method, mode, examples in OPERATIONS:
        strategy = schema[path][method].as_strategy(generation_mode=mode)

        @settings(SETTINGS, max_examples=examples)
        @given(case=strategy, token=st.sampled_from(TOKENS[:3]))
        def run(case: Any, token: str) -> None:
            nonlocal calls
            if case.path.startswith("/v1/") and "Authorization" not in (case.headers or {}):
                case.headers = {**(case.headers or {}), "Authorization": token}
            response = case.call(base_url=gateway.url, timeout=60)
            calls += 1
            assert response.status_code < 500, (
                response.status_code,
                response.text[:300],
                case.method,
                case.formatted_path,
                case.body,
            )

        run()
    assert calls >= 150
