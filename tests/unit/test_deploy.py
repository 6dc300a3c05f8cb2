"""Deployment artefacts under `deploy/`: the Helm chart, the alert rules and the Grafana dashboard.

The chart must lint `--strict` with the least a production install sets and with every option on
(both store modes), and the rendered objects must validate offline against Kubernetes' own schemas
(`kubernetes-validate`, strict: unknown fields fail); the CRD kinds it renders (ServiceMonitor,
PrometheusRule, ScaledObject, TriggerAuthentication), which those schemas do not cover, are
checked against the fields Conveyor relies on. `values.schema.json` must reject typos. The alert
rules must pass `promtool check rules` and their own unit tests, and every dashboard query must use
a real `conveyor_` metric. The chart's newer options have their own tests in
test_chart_options.py, the alert rules' quiet-pipeline cases in test_alert_rules.py.

The tools come from `deploy/tools/install-tools.sh`; a missing tool fails the test: these checks
are never skipped.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.deploysupport import (
    ALERTS,
    CHART,
    CRD_KINDS,
    DASHBOARD,
    DEPLOY,
    EMBEDDED_VALUES,
    FULL_VALUES,
    HELM_KUBE_VERSION,
    K8S_VERSIONS,
    MINIMAL_VALUES,
    SERVICES,
    STAGES,
    Objects,
    by_kind,
    env_by_name,
    helm_path,
    kubernetes_validate,
    promtool_path,
    render,
    run,
    sole_container,
    template,
    validate_builtin,
)

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


# --- tools and renders ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm_bin() -> str:
    return helm_path()


@pytest.fixture(scope="module")
def promtool_bin() -> str:
    return promtool_path()


@pytest.fixture(scope="module")
def kv() -> ModuleType:
    return kubernetes_validate()


@pytest.fixture(scope="module")
def default_objects(helm_bin: str) -> Objects:
    """The least a production install sets: an existing Secret (the bare chart refuses)."""
    return render(helm_bin, "-f", str(MINIMAL_VALUES))


@pytest.fixture(scope="module")
def full_objects(helm_bin: str) -> Objects:
    return render(helm_bin, "-f", str(FULL_VALUES))


@pytest.fixture(scope="module")
def embedded_objects(helm_bin: str) -> Objects:
    return render(helm_bin, "-f", str(EMBEDDED_VALUES))


# --- chart: lint and schema ----------------------------------------------------------------------


def _lint(helm_bin: str, *flags: str) -> Any:
    return run(helm_bin, "lint", str(CHART), "--kube-version", HELM_KUBE_VERSION, *flags)


@pytest.mark.parametrize(
    "flags",
    [
        (),
        ("--strict",),
        ("--strict", "-f", str(MINIMAL_VALUES)),
        ("--strict", "-f", str(FULL_VALUES)),
        ("--strict", "-f", str(EMBEDDED_VALUES)),
    ],
    ids=[
        "lint",
        "lint-strict",
        "lint-strict-minimal-values",
        "lint-strict-full-values",
        "lint-strict-embedded-values",
    ],
)
def test_chart_passes_helm_lint(helm_bin: str, flags: tuple[str, ...]) -> None:
    # Lint reports the chart's own `fail` checks (no store URL in the bare chart) as INFO and
    # passes; `helm template`/`install` stop on them (test_chart_options.py).
    proc = _lint(helm_bin, *flags)
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
    proc = template(helm_bin, "-f", str(MINIMAL_VALUES), *args)
    assert proc.returncode != 0, f"helm accepted {args}"
    assert "schema" in proc.stderr and complaint in proc.stderr, proc.stderr


def test_sasl_without_password_secret_is_refused(helm_bin: str) -> None:
    proc = template(
        helm_bin, "-f", str(MINIMAL_VALUES), "--set", "kafka.sasl.mechanism=SCRAM-SHA-512"
    )
    assert proc.returncode != 0
    assert "kafka.sasl.existingSecret is required" in proc.stderr


# --- chart: rendered objects validate ------------------------------------------------------------


def test_default_render_validates_against_kubernetes_schemas(
    kv: ModuleType, default_objects: Objects
) -> None:
    kinds = {o["kind"] for o in default_objects}
    assert {"Deployment", "Service", "ConfigMap", "Job", "PodDisruptionBudget"} <= kinds
    assert validate_builtin(kv, default_objects) == set(), "CRDs must be off by default"


def test_full_render_validates_against_kubernetes_schemas(
    kv: ModuleType, full_objects: Objects
) -> None:
    assert validate_builtin(kv, full_objects) == CRD_KINDS
    kinds = {o["kind"] for o in full_objects}
    every_option = {
        "HorizontalPodAutoscaler",
        "Ingress",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "Pod",
        "PodDisruptionBudget",
        "Secret",
    }
    assert every_option <= kinds, every_option - kinds


def test_embedded_render_validates_against_kubernetes_schemas(
    kv: ModuleType, embedded_objects: Objects
) -> None:
    assert validate_builtin(kv, embedded_objects) == {"ServiceMonitor", "PrometheusRule"}


def test_strict_validation_catches_a_misspelt_field(
    kv: ModuleType, default_objects: Objects
) -> None:
    deployment = copy.deepcopy(next(o for o in default_objects if o["kind"] == "Deployment"))
    sole_container(deployment)["imagePullPolicyy"] = "Always"
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
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "interval": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["alert", "expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": {"type": "string"},
                                            "labels": {"type": "object"},
                                            "annotations": {"type": "object"},
                                        },
                                    },
                                },
                            },
                        },
                    }
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


def test_full_render_crd_objects_are_well_formed(full_objects: Objects) -> None:
    import jsonschema  # a kubernetes-validate dependency

    for obj in full_objects:
        if obj["kind"] in CRD_KINDS:
            jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])


VARIANTS = {
    "chart-created-secret": (
        "--set",
        "secrets.values.storeUrl=postgresql://conveyor:pw@db:5432/conveyor",
        "--set-json",
        'secrets.values.webhookSecrets={"acme": "whsec_c2VjcmV0"}',
        "--set-json",
        'secrets.values.gatewayTokens={"t0ken": "acme"}',
    ),
    "keda-over-tls-without-sasl": (
        "-f",
        str(MINIMAL_VALUES),
        "--set",
        "keda.enabled=true",
        "--set",
        "kafka.securityProtocol=SSL",
        "--set",
        "kafka.tls.existingSecret=kafka-ca",
    ),
    "minimal": (
        "-f",
        str(MINIMAL_VALUES),
        "--set",
        "gateway.enabled=false",
        "--set",
        "topics.apply=false",
        "--set",
        "podDisruptionBudget.enabled=false",
        "--set",
        "serviceAccount.create=false",
        "--set",
        "tests.enabled=false",
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_value_variants_render_valid_objects(helm_bin: str, kv: ModuleType, variant: str) -> None:
    objects = render(helm_bin, *VARIANTS[variant])
    validate_builtin(kv, objects)
    deployments = by_kind(objects, "Deployment")
    if variant == "chart-created-secret":
        data = by_kind(objects, "Secret")["conveyor"]["stringData"]
        assert json.loads(data["webhook-secrets"]) == {"acme": "whsec_c2VjcmV0"}
        assert json.loads(data["gateway-tokens"]) == {"t0ken": "acme"}
        for name, deployment in deployments.items():
            assert "checksum/secret" in deployment["spec"]["template"]["metadata"]["annotations"]
            variables = env_by_name(sole_container(deployment))
            if name in ("conveyor-writeback", "conveyor-notify", "conveyor-gateway"):
                ref = variables["CONVEYOR_STORE_URL"]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "conveyor", "key": "store-url"}, name
            else:
                assert "CONVEYOR_STORE_URL" not in variables, name
    elif variant == "keda-over-tls-without-sasl":
        (auth,) = by_kind(objects, "TriggerAuthentication").values()
        params = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
        assert params == {"tls", "ca"}
    else:
        assert "conveyor-gateway" not in deployments
        unwanted = {"Job", "PodDisruptionBudget", "ServiceAccount", "Pod"}
        assert not unwanted & {o["kind"] for o in objects}
        pod = deployments["conveyor-notify"]["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "default"


# --- chart: what the rendered objects say --------------------------------------------------------


def test_every_service_has_probes_metrics_port_and_config_checksum(
    default_objects: Objects,
) -> None:
    deployments = by_kind(default_objects, "Deployment")
    assert sorted(deployments) == sorted(f"conveyor-{s}" for s in SERVICES)
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]
        assert "checksum/config" in pod["metadata"]["annotations"], name
        assert pod["spec"]["terminationGracePeriodSeconds"] >= 60, name
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, name
        main = sole_container(deployment)
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        assert ports["metrics"] == 9100, name
        expected = {
            "startupProbe": "/readyz",
            "livenessProbe": "/healthz",
            "readinessProbe": "/readyz",
        }
        for probe, path in expected.items():
            assert main[probe]["httpGet"]["path"] == path, (name, probe)
        assert main["envFrom"][0]["configMapRef"]["name"] == "conveyor"
        labels = deployment["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "conveyor"
        assert labels["app.kubernetes.io/component"] == name.removeprefix("conveyor-")
    for stage in STAGES:
        assert sole_container(deployments[f"conveyor-{stage}"])["command"] == [
            "python",
            "-m",
            f"conveyor.services.{stage}",
        ]
    gateway = deployments["conveyor-gateway"]
    assert sole_container(gateway)["command"] == ["conveyor", "run", "gateway"]
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in sole_container(gateway)[
        "ports"
    ]
    config = by_kind(default_objects, "ConfigMap")["conveyor"]["data"]
    assert config["CONVEYOR_METRICS_HOST"] == "0.0.0.0"
    assert config["CONVEYOR_METRICS_PORT"] == "9100"
    assert config["CONVEYOR_LOG_FORMAT"] == "json"
    assert json.loads(config["CONVEYOR_RETRY_DELAYS"]) == [1, 10, 60]


def test_gateway_service_and_metrics_service(default_objects: Objects) -> None:
    services = by_kind(default_objects, "Service")
    gateway = services["conveyor-gateway"]["spec"]
    assert gateway["selector"]["app.kubernetes.io/component"] == "gateway"
    assert gateway["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    metrics = services["conveyor-metrics"]["spec"]
    assert metrics["clusterIP"] == "None"
    assert metrics["ports"][0]["targetPort"] == "metrics"


def test_topic_hook_job_applies_one_retry_topic_per_delay(
    default_objects: Objects, full_objects: Objects
) -> None:
    for objects, rungs in ((default_objects, "3"), (full_objects, "4")):
        job = by_kind(objects, "Job")["conveyor-topics"]
        hooks = job["metadata"]["annotations"]["helm.sh/hook"]
        assert set(hooks.split(",")) == {"pre-install", "pre-upgrade"}
        command = sole_container(job)["command"]
        assert command[:3] == ["conveyor", "topics", "apply"]
        assert command[command.index("--rungs") + 1] == rungs
        assert "--partitions" in command and "--replication" in command
        # A pre-install hook runs before the chart's ConfigMap exists: settings come inline.
        assert "envFrom" not in sole_container(job)
        assert "CONVEYOR_KAFKA_BOOTSTRAP" in env_by_name(sole_container(job))


def test_full_render_wires_gpu_secrets_keda_pdb_and_servicemonitor(
    full_objects: Objects,
) -> None:
    deployments = by_kind(full_objects, "Deployment")
    inference = deployments["conveyor-inference"]
    pod = inference["spec"]["template"]["spec"]
    assert sole_container(inference)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"node-pool": "gpu", "nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]

    for name, deployment in deployments.items():
        variables = env_by_name(sole_container(deployment))
        password = variables["CONVEYOR_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert password == {"name": "kafka-credentials", "key": "password"}, name
        mounts = {m["name"]: m for m in sole_container(deployment)["volumeMounts"]}
        assert mounts["kafka-ca"]["readOnly"] is True, name
        if name in ("conveyor-writeback", "conveyor-notify", "conveyor-gateway"):
            store = variables["CONVEYOR_STORE_URL"]["valueFrom"]["secretKeyRef"]
            assert store == {"name": "conveyor-app", "key": "store-url"}, name
        else:
            assert "CONVEYOR_STORE_URL" not in variables, name
        # KEDA owns the stages' replica counts, an HPA the gateway's.
        assert "replicas" not in deployment["spec"], name
    notify_env = env_by_name(sole_container(deployments["conveyor-notify"]))
    webhook_ref = notify_env["CONVEYOR_WEBHOOK_SECRETS"]["valueFrom"]["secretKeyRef"]
    # full-values renames the key: the mapping follows secrets.webhookSecrets.
    assert webhook_ref == {"name": "conveyor-app", "key": "webhook-signing-secrets"}
    assert "value" not in notify_env["CONVEYOR_STORE_URL"], "no credentials inline"

    config = by_kind(full_objects, "ConfigMap")["conveyor"]["data"]
    assert config["CONVEYOR_KAFKA_SSL_CA_LOCATION"] == "/etc/conveyor/kafka-ca/ca.crt"
    assert "CONVEYOR_KAFKA_SASL_PASSWORD" not in config

    scaled = by_kind(full_objects, "ScaledObject")
    assert sorted(scaled) == sorted(f"conveyor-{s}" for s in STAGES)
    auth = set(by_kind(full_objects, "TriggerAuthentication"))
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

    pdbs = by_kind(full_objects, "PodDisruptionBudget")
    assert sorted(pdbs) == sorted(f"conveyor-{s}" for s in SERVICES)

    monitor = next(iter(by_kind(full_objects, "ServiceMonitor").values()))
    metrics_service = by_kind(full_objects, "Service")["conveyor-metrics"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics_service["metadata"]["labels"].items()
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# --- Prometheus alert rules ----------------------------------------------------------------------


def test_alert_rules_pass_promtool_check(promtool_bin: str) -> None:
    proc = run(promtool_bin, "check", "rules", str(ALERTS))
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
    assert re.search(r"^ARG BASE_IMAGE=\S*debian:bookworm-slim$", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert re.search(r"^ARG EXTRAS=ml$", text, re.M)
    assert 'pip install -q ".${EXTRAS:+[$EXTRAS]}"' in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0")), users


def test_install_tools_script_is_valid_bash() -> None:
    script = DEPLOY / "tools" / "install-tools.sh"
    proc = run("bash", "-n", str(script))
    assert proc.returncode == 0, proc.stderr
    assert "helm.sh/helm/v3/cmd/helm@" in script.read_text()
