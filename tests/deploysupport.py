"""Shared helpers of the deployment tests (chart, alert rules, dashboard, image).

The tools come from `deploy/tools/install-tools.sh` (helm in `<repo>/.cache/bin`, promtool from
the Debian `prometheus` package, `kubernetes-validate` in the venv). A missing tool fails the
test: these checks are never skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "k8s" / "conveyor"
CI_VALUES = CHART / "ci"
FULL_VALUES = CI_VALUES / "full-values.yaml"
EMBEDDED_VALUES = CI_VALUES / "embedded-values.yaml"
MINIMAL_VALUES = CI_VALUES / "minimal-values.yaml"
# The rules and the dashboard live in the chart (its PrometheusRule and dashboard ConfigMap read
# them); deploy/prometheus and deploy/grafana link to them.
ALERTS = CHART / "files" / "conveyor-alerts.yml"
DASHBOARD = CHART / "files" / "conveyor-dashboard.json"
PROMETHEUS = DEPLOY / "prometheus"
INSTALL_HINT = "run deploy/tools/install-tools.sh to install it"

# The chart's kubeVersion floor and the newest release kubernetes-validate 1.37.0 bundles.
K8S_VERSIONS = ("1.25.0", "1.37.0")
# What `helm template` assumes; explicit so any helm build renders the same.
HELM_KUBE_VERSION = "1.33.0"
CRD_KINDS = {"ServiceMonitor", "ScaledObject", "TriggerAuthentication", "PrometheusRule"}
STAGES = ("preprocess", "inference", "moderation", "writeback", "notify")
SERVICES = (*STAGES, "gateway")
TOOL_TIMEOUT_S = 120

Objects = list[dict[str, Any]]


def tool(name: str, *candidates: Path) -> str:
    for path in candidates:
        if path.is_file():
            return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} not found (looked in {[str(c) for c in candidates]} and PATH); {INSTALL_HINT}"
        )
    return found


def helm_path() -> str:
    return tool("helm", REPO / ".cache" / "bin" / "helm")


def promtool_path() -> str:
    return tool("promtool")


def kubernetes_validate() -> ModuleType:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"the kubernetes-validate package is not installed; {INSTALL_HINT}")
    module: ModuleType = kubernetes_validate
    return module


def run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
    )


def template(helm_bin: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart as release "conveyor" in namespace "pipeline"."""
    return run(
        helm_bin,
        "template",
        "conveyor",
        str(CHART),
        "--namespace",
        "pipeline",
        "--kube-version",
        HELM_KUBE_VERSION,
        *args,
    )


def render(helm_bin: str, *args: str) -> Objects:
    proc = template(helm_bin, *args)
    assert proc.returncode == 0, f"helm template {' '.join(args)} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def by_kind(objects: Objects, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a Deployment or Job, or a Pod's own spec."""
    spec: dict[str, Any] = workload["spec"]
    return spec["template"]["spec"] if "template" in spec else spec


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = pod_spec(workload)["containers"]
    return found


def sole_container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = containers(workload)
    return only


def env_by_name(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def validate_builtin(kv: ModuleType, objects: Objects) -> set[str]:
    """Validate every non-CRD object strictly for each Kubernetes version; return the CRD kinds."""
    crds: set[str] = set()
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            crds.add(obj["kind"])
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as err:
                path = ".".join(str(p) for p in err.path)
                pytest.fail(
                    f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes "
                    f"{version} at {path}: {err.message}"
                )
            except kv.SchemaNotFoundError as err:
                pytest.fail(f"no Kubernetes schema for {obj['kind']}: {err.message}")
    return crds
