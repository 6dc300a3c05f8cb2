"""Deployment artefacts under `deploy/`: the Helm chart, the alert rules and the Grafana dashboard.

The chart must lint (also `--strict`), render with its defaults and with every option on, and the
rendered objects must validate offline against Kubernetes' own schemas (`kubernetes-validate`,
strict: unknown fields fail); the CRD kinds it renders (ServiceMonitor, ScaledObject,
TriggerAuthentication), which those schemas do not cover, are checked against the fields Conveyor
relies on. `values.schema.json` must reject typos. The alert rules must pass `promtool check
rules` and their own unit tests, and every dashboard query must use a real `conveyor_` metric.

The tools come from `deploy/tools/install-tools.sh` (helm in `<repo>/.cache/bin`, promtool from
the Debian `prometheus` package, `kubernetes-validate` in the venv). A missing tool fails the
test: these checks are never skipped.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "k8s" / "conveyor"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
ALERTS = DEPLOY / "prometheus" / "conveyor-alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "conveyor-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "conveyor-dashboard.json"
INSTALL_HINT = "run deploy/tools/install-tools.sh to install it"

# The chart's kubeVersion floor and the newest release kubernetes-validate 1.37.0 bundles.
K8S_VERSIONS = ("1.25.0", "1.37.0")
# What `helm template` assumes; explicit so any helm build renders the same.
HELM_KUBE_VERSION = "1.33.0"
CRD_KINDS = {"ServiceMonitor", "ScaledObject", "TriggerAuthentication"}
STAGES = ("preprocess", "inference", "moderation", "writeback", "notify")
SERVICES = (*STAGES, "gateway")
TOOL_TIMEOUT_S = 120

# Every metric the runtime exports (libs/conveyor/telemetry/metrics.py), by exposition name.
COUNTERS = (
    "conveyor_events_consumed_total",
    "conveyor_events_emitted_total",
    "conveyor_retries_total",
    "conveyor_dead_letters_total",
)
HISTOGRAMS = (
    "conveyor_handler_duration_seconds",
    "conveyor_e2e_latency_seconds",
    "conveyor_batch_size",
)
GAUGES = (
    "conveyor_in_flight",
    "conveyor_paused_partitions",
    "conveyor_consumer_lag",
    "conveyor_gpu_memory_bytes",
    "conveyor_gpu_utilization_ratio",
)
METRICS = frozenset((*COUNTERS, *HISTOGRAMS, *GAUGES))
SERIES_NAMES = METRICS | {
    f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")
}
METRIC_RE = re.compile(r"\bconveyor_[a-z0-9_]+")


# --- tools ---------------------------------------------------------------------------------------


def _tool(name: str, *candidates: Path) -> str:
    for path in candidates:
        if path.is_file():
            return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} not found (looked in {[str(c) for c in candidates]} and PATH); {INSTALL_HINT}"
        )
    return found


@pytest.fixture(scope="module")
def helm_bin() -> str:
    return _tool("helm", REPO / ".cache" / "bin" / "helm")


@pytest.fixture(scope="module")
def promtool_bin() -> str:
    return _tool("promtool")


@pytest.fixture(scope="module")
def kv() -> ModuleType:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"the kubernetes-validate package is not installed; {INSTALL_HINT}")
    module: ModuleType = kubernetes_validate
    return module


def _run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
    )


def _helm(helm_bin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(helm_bin, *args)


def _render(helm_bin: str, *args: str) -> list[dict[str, Any]]:
    proc = _helm(
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
    assert proc.returncode == 0, f"helm template {' '.join(args)} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def default_objects(helm_bin: str) -> list[dict[str, Any]]:
    return _render(helm_bin)


@pytest.fixture(scope="module")
def full_objects(helm_bin: str) -> list[dict[str, Any]]:
    return _render(helm_bin, "-f", str(FULL_VALUES))


def _by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# --- chart: lint and schema ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [(), ("--strict",), ("--strict", "-f", str(FULL_VALUES))],
    ids=["lint", "lint-strict", "lint-strict-full-values"],
)
def test_chart_passes_helm_lint(helm_bin: str, flags: tuple[str, ...]) -> None:
    proc = _helm(helm_bin, "lint", str(CHART), "--kube-version", HELM_KUBE_VERSION, *flags)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("--set-string", "preprocess.replicas=two"), "/preprocess/replicas"),
        (("--set", "replicaCount=2"), "replicaCount"),
        (("--set", "inference.gpu.enable=true"), "enable"),
        (("--set", "kafka.securityProtocol=PLAIN"), "/kafka/securityProtocol"),
        (("--set", "config.logFormat=yaml"), "/config/logFormat"),
        (("--set", "gateway.service.prot=80"), "prot"),
    ],
    ids=[
        "replicas-not-integer",
        "unknown-top-level-key",
        "unknown-nested-key",
        "bad-security-protocol",
        "bad-log-format",
        "typo-in-service",
    ],
)
def test_values_schema_rejects_bad_values(
    helm_bin: str, args: tuple[str, ...], complaint: str
) -> None:
    proc = _helm(
        helm_bin, "template", "conveyor", str(CHART), "--kube-version", HELM_KUBE_VERSION, *args
    )
    assert proc.returncode != 0, f"helm accepted {args}"
    assert "schema" in proc.stderr and complaint in proc.stderr, proc.stderr


def test_sasl_without_password_secret_is_refused(helm_bin: str) -> None:
    proc = _helm(
        helm_bin,
        "template",
        "conveyor",
        str(CHART),
        "--kube-version",
        HELM_KUBE_VERSION,
        "--set",
        "kafka.sasl.mechanism=SCRAM-SHA-512",
    )
    assert proc.returncode != 0
    assert "kafka.sasl.existingSecret is required" in proc.stderr


# --- chart: rendered objects validate ------------------------------------------------------------


def _validate_builtin(kv: ModuleType, objects: list[dict[str, Any]]) -> set[str]:
    """Validate every non-CRD object strictly; return the CRD kinds seen."""
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


def test_default_render_validates_against_kubernetes_schemas(
    kv: ModuleType, default_objects: list[dict[str, Any]]
) -> None:
    kinds = {o["kind"] for o in default_objects}
    assert {"Deployment", "Service", "ConfigMap", "Job", "PodDisruptionBudget"} <= kinds
    assert _validate_builtin(kv, default_objects) == set(), "CRDs must be off by default"


def test_full_render_validates_against_kubernetes_schemas(
    kv: ModuleType, full_objects: list[dict[str, Any]]
) -> None:
    assert _validate_builtin(kv, full_objects) == CRD_KINDS


def test_strict_validation_catches_a_misspelt_field(
    kv: ModuleType, default_objects: list[dict[str, Any]]
) -> None:
    deployment = copy.deepcopy(next(o for o in default_objects if o["kind"] == "Deployment"))
    _container(deployment)["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSIONS[-1], strict=True)


# Minimal structural schemas of the CRD fields the chart sets (the CRDs' own OpenAPI schemas are
# not available offline).
_NAME_REF = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": {"type": "object", "required": ["matchLabels"]},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port", "path"],
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"const": "/metrics"},
                                "interval": {"type": "string"},
                                "relabelings": {"type": "array"},
                            },
                        },
                    },
                },
            },
        },
    },
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": _NAME_REF,
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"const": "kafka"},
                                "authenticationRef": _NAME_REF,
                                "metadata": {
                                    "type": "object",
                                    "required": [
                                        "bootstrapServers",
                                        "consumerGroup",
                                        "topic",
                                        "lagThreshold",
                                    ],
                                    # KEDA reads trigger metadata as strings only.
                                    "additionalProperties": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {
                "type": "object",
                "required": ["secretTargetRef"],
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                            "additionalProperties": False,
                            "properties": {
                                "parameter": {
                                    "enum": [
                                        "sasl",
                                        "username",
                                        "password",
                                        "tls",
                                        "ca",
                                        "cert",
                                        "key",
                                    ]
                                },
                                "name": {"type": "string"},
                                "key": {"type": "string"},
                            },
                        },
                    }
                },
            },
        },
    },
}


def test_full_render_crd_objects_are_well_formed(full_objects: list[dict[str, Any]]) -> None:
    import jsonschema  # a kubernetes-validate dependency

    for obj in full_objects:
        if obj["kind"] in CRD_KINDS:
            jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])


VARIANTS = {
    "chart-created-secret": (
        "--set",
        "secrets.values.storeUrl=postgresql://conveyor:pw@db:5432/conveyor",
        "--set-json",
        'secrets.values.webhookSecrets={"acme": "s3cr3t"}',
    ),
    "keda-over-tls-without-sasl": (
        "--set",
        "keda.enabled=true",
        "--set",
        "kafka.securityProtocol=SSL",
        "--set",
        "kafka.tls.existingSecret=kafka-ca",
    ),
    "minimal": (
        "--set",
        "gateway.enabled=false",
        "--set",
        "topics.apply=false",
        "--set",
        "podDisruptionBudget.enabled=false",
        "--set",
        "serviceAccount.create=false",
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_value_variants_render_valid_objects(helm_bin: str, kv: ModuleType, variant: str) -> None:
    objects = _render(helm_bin, *VARIANTS[variant])
    _validate_builtin(kv, objects)
    deployments = _by_kind(objects, "Deployment")
    if variant == "chart-created-secret":
        assert _by_kind(objects, "Secret")["conveyor"]["stringData"]["webhook-secrets"]
        for name, deployment in deployments.items():
            assert "checksum/secret" in deployment["spec"]["template"]["metadata"]["annotations"]
            env = _env(_container(deployment))
            if name in ("conveyor-writeback", "conveyor-notify", "conveyor-gateway"):
                ref = env["CONVEYOR_STORE_URL"]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "conveyor", "key": "store-url"}, name
            else:
                assert "CONVEYOR_STORE_URL" not in env, name
    elif variant == "keda-over-tls-without-sasl":
        (auth,) = _by_kind(objects, "TriggerAuthentication").values()
        params = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
        assert params == {"tls", "ca"}
    else:
        assert "conveyor-gateway" not in deployments
        assert not {"Job", "PodDisruptionBudget", "ServiceAccount"} & {o["kind"] for o in objects}
        pod = deployments["conveyor-notify"]["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "default"


# --- chart: what the rendered objects say --------------------------------------------------------


def test_every_service_has_probes_metrics_port_and_config_checksum(
    default_objects: list[dict[str, Any]],
) -> None:
    deployments = _by_kind(default_objects, "Deployment")
    assert sorted(deployments) == sorted(f"conveyor-{s}" for s in SERVICES)
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        assert "checksum/config" in pod["metadata"]["annotations"], name
        assert pod["spec"]["terminationGracePeriodSeconds"] >= 60, name
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, name
        container = _container(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == 9100, name
        expected = {
            "startupProbe": "/readyz",
            "livenessProbe": "/healthz",
            "readinessProbe": "/readyz",
        }
        for probe, path in expected.items():
            assert container[probe]["httpGet"]["path"] == path, (name, probe)
        assert container["envFrom"][0]["configMapRef"]["name"] == "conveyor"
        labels = deployment["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "conveyor"
        assert labels["app.kubernetes.io/component"] == name.removeprefix("conveyor-")
    for stage in STAGES:
        assert _container(deployments[f"conveyor-{stage}"])["command"] == [
            "python",
            "-m",
            f"services.{stage}",
        ]
    gateway = deployments["conveyor-gateway"]
    assert _container(gateway)["command"] == ["conveyor", "run", "gateway"]
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in _container(gateway)[
        "ports"
    ]
    config = _by_kind(default_objects, "ConfigMap")["conveyor"]["data"]
    assert config["CONVEYOR_METRICS_HOST"] == "0.0.0.0"
    assert config["CONVEYOR_METRICS_PORT"] == "9100"
    assert config["CONVEYOR_LOG_FORMAT"] == "json"
    assert json.loads(config["CONVEYOR_RETRY_DELAYS"]) == [1, 10, 60]


def test_gateway_service_and_metrics_service(default_objects: list[dict[str, Any]]) -> None:
    services = _by_kind(default_objects, "Service")
    gateway = services["conveyor-gateway"]["spec"]
    assert gateway["selector"]["app.kubernetes.io/component"] == "gateway"
    assert gateway["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    metrics = services["conveyor-metrics"]["spec"]
    assert metrics["clusterIP"] == "None"
    assert metrics["ports"][0]["targetPort"] == "metrics"


def test_topic_hook_job_applies_one_retry_topic_per_delay(
    default_objects: list[dict[str, Any]], full_objects: list[dict[str, Any]]
) -> None:
    for objects, rungs in ((default_objects, "3"), (full_objects, "4")):
        job = _by_kind(objects, "Job")["conveyor-topics"]
        hooks = job["metadata"]["annotations"]["helm.sh/hook"]
        assert set(hooks.split(",")) == {"pre-install", "pre-upgrade"}
        command = _container(job)["command"]
        assert command[:3] == ["conveyor", "topics", "apply"]
        assert command[command.index("--rungs") + 1] == rungs
        assert "--partitions" in command and "--replication" in command
        # A pre-install hook runs before the chart's ConfigMap exists: settings come inline.
        assert "envFrom" not in _container(job)
        assert "CONVEYOR_KAFKA_BOOTSTRAP" in _env(_container(job))


def test_full_render_wires_gpu_secrets_keda_pdb_and_servicemonitor(
    full_objects: list[dict[str, Any]],
) -> None:
    deployments = _by_kind(full_objects, "Deployment")
    inference = deployments["conveyor-inference"]
    pod = inference["spec"]["template"]["spec"]
    assert _container(inference)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"node-pool": "gpu", "nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]

    for name, deployment in deployments.items():
        env = _env(_container(deployment))
        password = env["CONVEYOR_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert password == {"name": "kafka-credentials", "key": "password"}, name
        mounts = {m["name"]: m for m in _container(deployment)["volumeMounts"]}
        assert mounts["kafka-ca"]["readOnly"] is True, name
        if name in ("conveyor-writeback", "conveyor-notify", "conveyor-gateway"):
            store = env["CONVEYOR_STORE_URL"]["valueFrom"]["secretKeyRef"]
            assert store == {"name": "conveyor-app", "key": "store-url"}, name
        else:
            assert "CONVEYOR_STORE_URL" not in env, name
        # KEDA owns the stages' replica counts.
        assert ("replicas" in deployment["spec"]) == (name == "conveyor-gateway"), name
    notify_env = _env(_container(deployments["conveyor-notify"]))
    assert (
        notify_env["CONVEYOR_WEBHOOK_SECRETS"]["valueFrom"]["secretKeyRef"]["name"]
        == "conveyor-app"
    )
    assert "value" not in notify_env["CONVEYOR_STORE_URL"], "no credentials inline"

    config = _by_kind(full_objects, "ConfigMap")["conveyor"]["data"]
    assert config["CONVEYOR_KAFKA_SSL_CA_LOCATION"] == "/etc/conveyor/kafka-ca/ca.crt"
    assert "CONVEYOR_KAFKA_SASL_PASSWORD" not in config

    scaled = _by_kind(full_objects, "ScaledObject")
    assert sorted(scaled) == sorted(f"conveyor-{s}" for s in STAGES)
    auth = set(_by_kind(full_objects, "TriggerAuthentication"))
    for stage in STAGES:
        spec = scaled[f"conveyor-{stage}"]["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments
        for trigger in spec["triggers"]:
            assert trigger["metadata"]["consumerGroup"] == f"prod.conveyor.{stage}"
            assert trigger["metadata"]["topic"].startswith("prod.conveyor.task.")
            assert trigger["authenticationRef"]["name"] in auth
    lanes = {t["metadata"]["topic"] for t in scaled["conveyor-inference"]["spec"]["triggers"]}
    assert lanes == {
        f"prod.conveyor.task.preprocessed.{lane}" for lane in ("high", "normal", "low")
    }

    pdbs = _by_kind(full_objects, "PodDisruptionBudget")
    assert sorted(pdbs) == sorted(f"conveyor-{s}" for s in SERVICES)

    monitor = next(iter(_by_kind(full_objects, "ServiceMonitor").values()))
    metrics_service = _by_kind(full_objects, "Service")["conveyor-metrics"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics_service["metadata"]["labels"].items()
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# --- Prometheus alert rules ----------------------------------------------------------------------


def test_alert_rules_pass_promtool_check(promtool_bin: str) -> None:
    proc = _run(promtool_bin, "check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_fire_as_their_unit_tests_expect(promtool_bin: str) -> None:
    proc = _run(promtool_bin, "test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _alert_rules() -> Iterator[dict[str, Any]]:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        yield from group["rules"]


def test_alert_rules_cover_the_failure_modes_with_for_severity_and_annotations() -> None:
    rules = list(_alert_rules())
    names = {r["alert"] for r in rules}
    assert {
        "ConveyorDeadLettersIncreasing",
        "ConveyorConsumerLagHigh",
        "ConveyorConsumerLagGrowing",
        "ConveyorE2ELatencyHigh",
        "ConveyorStageDown",
        "ConveyorStageMetricsAbsent",
        "ConveyorRetryStorm",
    } <= names
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        unknown = set(METRIC_RE.findall(rule["expr"])) - SERIES_NAMES
        assert not unknown, f"{rule['alert']} uses unknown metrics {unknown}"


# --- Grafana dashboard ---------------------------------------------------------------------------


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_panels_query_known_conveyor_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = set(METRIC_RE.findall(target["expr"]))
            assert names, f"panel {panel['title']!r} queries no conveyor_ metric"
            assert names <= SERIES_NAMES, (
                f"panel {panel['title']!r}: unknown {names - SERIES_NAMES}"
            )
            used |= {
                n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in names
            }
    assert used == METRICS, f"metrics without a panel: {sorted(METRICS - used)}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert len({p["id"] for p in _panels(dashboard)}) == len(list(_panels(dashboard)))


# --- image and tooling ---------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_image_with_the_ml_extras() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert 'pip install ".[ml]"' in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0")), users


def test_install_tools_script_is_valid_bash() -> None:
    script = DEPLOY / "tools" / "install-tools.sh"
    proc = _run("bash", "-n", str(script))
    assert proc.returncode == 0, proc.stderr
    assert "helm.sh/helm/v3/cmd/helm@" in script.read_text()
