"""The container image builds without a daemon and its services run from the built filesystem.

`deploy/tools/build-image.sh` (what `make image` runs) builds deploy/docker/Dockerfile with buildah
(chroot isolation) on a Debian bookworm base bootstrapped from Debian packages where no registry
serves one. To stay small this test builds it without the ML extras (EXTRAS=""): every step of the
Dockerfile runs except the torch/transformers install. It then starts, from the image's filesystem
(`buildah run`, which shares the host network, so the session broker is reachable on 127.0.0.1):
`conveyor topics apply`, the writeback stage (ready = consuming from Kafka, with its SQLite store),
and the gateway, to which it submits a task over HTTP and finds it on the Kafka input topic; the
chart's `helm test` script then submits with `conveyor submit` and polls that gateway.

Needs root, buildah and mmdebstrap (deploy/tools/install-tools.sh), and the package registries.
A missing tool fails the test; the check is never skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from conveyor.net import free_ports
from tests.deploysupport import CHART, INSTALL_HINT, REPO
from tests.support import read_topics

IMAGE = "localhost/conveyor-image-test:slim"
# A cold build (bootstrap the base, apt, pip) takes ~2-3 minutes here; allow for a slow mirror.
BUILD_TIMEOUT_S = 1200
# Start of a service inside the image: Python imports, Kafka connect, group join.
READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
TOKEN = "image-test-token"
HELM_TEST_SCRIPT = CHART / "files" / "helm-test.py"


def _buildah() -> str:
    found = shutil.which("buildah")
    if found is None:
        pytest.fail(f"buildah not found; {INSTALL_HINT}")
    return found


@pytest.fixture(scope="module")
def image() -> str:
    _buildah()
    env = {**os.environ, "IMAGE": IMAGE, "EXTRAS": ""}
    proc = subprocess.run(
        ["bash", str(REPO / "deploy" / "tools" / "build-image.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return IMAGE


@pytest.fixture
def container(image: str) -> Iterator[str]:
    name = f"conveyor-test-{uuid.uuid4().hex[:8]}"
    subprocess.run([_buildah(), "from", "--name", name, image], capture_output=True, check=True)
    yield name
    subprocess.run([_buildah(), "rm", name], capture_output=True, check=False)


def _run_args(container: str, env: dict[str, str], *command: str) -> list[str]:
    flags = [f"--env={k}={v}" for k, v in env.items()]
    return [_buildah(), "run", "--isolation", "chroot", *flags, container, "--", *command]


@contextmanager
def _service(container: str, env: dict[str, str], *command: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        _run_args(container, env, *command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        # SIGTERM to the whole group: buildah run and the service it started (graceful drain).
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=STOP_TIMEOUT_S)


def _wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"service exited with {proc.returncode}:\n{output[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not ready within {READY_TIMEOUT_S} s")


def _base_env(bootstrap: str, prefix: str, metrics_port: int) -> dict[str, str]:
    return {
        "CONVEYOR_KAFKA_BOOTSTRAP": bootstrap,
        "CONVEYOR_TOPIC_PREFIX": prefix,
        "CONVEYOR_METRICS_HOST": "127.0.0.1",
        "CONVEYOR_METRICS_PORT": str(metrics_port),
        "CONVEYOR_STORE_URL": "sqlite:////tmp/conveyor.db",
        "CONVEYOR_LOG_FORMAT": "text",
    }


def _helm_test_script_submits_and_polls(container: str, env: dict[str, str], port: int) -> None:
    """The chart's `helm test` script, from the image: `conveyor submit` to Kafka, then polls the
    gateway with the token. No stage runs here, so it must time out on `pending`, saying so."""
    script_env = {
        **env,
        "CONVEYOR_TEST_KIND": "embed",
        "CONVEYOR_TEST_INPUT": "helm test from the image",
        "CONVEYOR_TEST_TIMEOUT_S": "3",
        "CONVEYOR_TEST_POLL_S": "0.5",
        "CONVEYOR_TEST_GATEWAY_URL": f"http://127.0.0.1:{port}",
        "CONVEYOR_TEST_GATEWAY_TOKENS": json.dumps({TOKEN: "acme"}),
    }
    proc = subprocess.run(
        _run_args(container, script_env, "python", "-c", HELM_TEST_SCRIPT.read_text()),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "submitted " in proc.stdout and "for tenant acme" in proc.stdout, proc.stdout
    assert "not completed in time (last status pending)" in proc.stderr, proc.stderr


def test_image_runs_as_its_non_root_user_with_the_cli(container: str) -> None:
    proc = subprocess.run(
        _run_args(container, {}, "sh", "-c", "id -u && conveyor --help"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    uid, *help_text = proc.stdout.splitlines()
    assert uid == "10001"
    assert "submit" in "\n".join(help_text)


def test_services_start_from_the_image_and_take_a_task(
    container: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    writeback_port, gateway_port, gateway_metrics = free_ports(3)
    env = _base_env(kafka_bootstrap, topic_prefix, writeback_port)
    topics = subprocess.run(
        _run_args(container, env, "conveyor", "topics", "apply", "--partitions", "1"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert topics.returncode == 0, topics.stderr

    gateway_env = {
        **_base_env(kafka_bootstrap, topic_prefix, gateway_metrics),
        "CONVEYOR_GATEWAY_HOST": "127.0.0.1",
        "CONVEYOR_GATEWAY_PORT": str(gateway_port),
        "CONVEYOR_GATEWAY_TOKENS": json.dumps({TOKEN: "acme"}),
    }
    with (
        _service(container, env, "python", "-m", "conveyor.services.writeback") as writeback,
        _service(container, gateway_env, "conveyor", "run", "gateway") as gateway,
    ):
        _wait_ready(f"http://127.0.0.1:{writeback_port}/readyz", writeback)
        _wait_ready(f"http://127.0.0.1:{gateway_port}/readyz", gateway)
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway_port}/v1/tasks",
            data=json.dumps({"kind": "embed", "input": "from the image"}).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 202
            task_id = json.load(answer)["task_id"]
        with urllib.request.urlopen(
            f"http://127.0.0.1:{writeback_port}/metrics", timeout=5
        ) as answer:
            assert b"conveyor_consumer_lag" in answer.read()
        _helm_test_script_submits_and_polls(container, env, gateway_port)

    # The gateway's task and the helm test script's.
    submitted = read_topics(kafka_bootstrap, [f"{topic_prefix}conveyor.task.submitted"], expect=2)
    assert len(submitted) == 2
    identities = [
        (m.key() or b"") + b"".join(v or b"" for _, v in m.headers() or []) for m in submitted
    ]
    assert any(task_id.encode() in i for i in identities), "the gateway published the task"
