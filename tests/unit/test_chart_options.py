"""The Helm chart's store, secrets, image and operational options, read from its renders.

What a platform team relies on: the chart refuses a pipeline without a shared store (unless the
single-pod embedded mode is chosen), every credential reaches a pod through `secretKeyRef`, the
default image is a pinned published one, pods are bounded in ephemeral storage, inference never
loses its only replica to a rollout or a drain, and the optional objects (Ingress, HPA,
NetworkPolicy, PVCs, PrometheusRule, dashboard, `helm test` pod) say what they should.
"""

from __future__ import annotations

import json
import py_compile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.deploysupport import (
    ALERTS,
    CHART,
    DASHBOARD,
    EMBEDDED_VALUES,
    FULL_VALUES,
    MINIMAL_VALUES,
    SERVICES,
    STAGES,
    Objects,
    by_kind,
    containers,
    env_by_name,
    helm_path,
    kubernetes_validate,
    pod_spec,
    render,
    sole_container,
    template,
    validate_builtin,
)

STORE_SERVICES = ("writeback", "notify", "gateway")
SECRET_ENV = {"CONVEYOR_STORE_URL", "CONVEYOR_GATEWAY_TOKENS", "CONVEYOR_WEBHOOK_SECRETS"}
TRIAL_SECRETS = (
    "--set",
    "secrets.values.storeUrl=postgresql://conveyor:pa55word@db:5432/conveyor",
    "--set-json",
    'secrets.values.gatewayTokens={"tok-3f9a": "acme"}',
    "--set-json",
    'secrets.values.webhookSecrets={"acme": "whsec_c2VjcmV0LXZhbHVl"}',
)


@pytest.fixture(scope="module")
def helm_bin() -> str:
    return helm_path()


@pytest.fixture(scope="module")
def kv() -> ModuleType:
    return kubernetes_validate()


@pytest.fixture(scope="module")
def minimal(helm_bin: str) -> Objects:
    return render(helm_bin, "-f", str(MINIMAL_VALUES))


@pytest.fixture(scope="module")
def full(helm_bin: str) -> Objects:
    return render(helm_bin, "-f", str(FULL_VALUES))


@pytest.fixture(scope="module")
def embedded(helm_bin: str) -> Objects:
    return render(helm_bin, "-f", str(EMBEDDED_VALUES))


def _workloads(objects: Objects) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "Job", "Pod")]


# --- the store -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [(), ("--set-json", 'secrets.values.gatewayTokens={"t": "acme"}')],
    ids=["bare", "tokens-but-no-store"],
)
def test_render_without_a_store_url_fails_with_a_clear_message(
    helm_bin: str, args: tuple[str, ...]
) -> None:
    proc = template(helm_bin, *args)
    assert proc.returncode != 0
    assert "Conveyor needs a PostgreSQL result store" in proc.stderr
    assert "secrets.existingSecret" in proc.stderr
    assert "store.embedded.enabled=true" in proc.stderr


def test_embedded_mode_with_a_store_url_is_refused(helm_bin: str) -> None:
    proc = template(helm_bin, *TRIAL_SECRETS, "--set", "store.embedded.enabled=true")
    assert proc.returncode != 0
    assert "Choose one" in proc.stderr


def test_gateway_without_tokens_is_refused(helm_bin: str) -> None:
    proc = template(helm_bin, "--set", "secrets.values.storeUrl=postgresql://u:p@db:5432/conveyor")
    assert proc.returncode != 0
    assert "The gateway needs bearer tokens" in proc.stderr


def test_embedded_mode_runs_the_store_services_in_one_single_replica_pod(
    embedded: Objects,
) -> None:
    deployments = by_kind(embedded, "Deployment")
    assert sorted(deployments) == sorted(
        ["conveyor-embedded", "conveyor-preprocess", "conveyor-inference", "conveyor-moderation"]
    )
    pod_deployment = deployments["conveyor-embedded"]
    assert pod_deployment["spec"]["replicas"] == 1
    assert pod_deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = pod_spec(pod_deployment)
    assert [c["name"] for c in pod["containers"]] == list(STORE_SERVICES)
    urls = set()
    ports = set()
    for c in pod["containers"]:
        variables = env_by_name(c)
        urls.add(variables["CONVEYOR_STORE_URL"]["value"])
        ports.add(int(variables["CONVEYOR_METRICS_PORT"]["value"]))
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["store"] == "/var/lib/conveyor/store"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = c[probe]["httpGet"]["port"]
            assert port in {p["name"] for p in c["ports"]}, (c["name"], probe)
    assert urls == {"sqlite:////var/lib/conveyor/store/conveyor.db"}
    assert len(ports) == 3, "one network namespace: each container its own metrics port"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["store"]["persistentVolumeClaim"]["claimName"] == "conveyor-store"
    claim = by_kind(embedded, "PersistentVolumeClaim")["conveyor-store"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # The gateway Service reaches the embedded pod; no HPA or KEDA object scales it.
    gateway = by_kind(embedded, "Service")["conveyor-gateway"]
    assert gateway["spec"]["selector"]["app.kubernetes.io/component"] == "embedded"
    scaled = {
        o["spec"]["scaleTargetRef"]["name"]
        for o in embedded
        if "scaleTargetRef" in o.get("spec", {})
    }
    assert "conveyor-embedded" not in scaled
    monitor = next(iter(by_kind(embedded, "ServiceMonitor").values()))
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [
        "metrics",
        "metrics-notify",
        "metrics-gateway",
    ]
    relabel = monitor["spec"]["endpoints"][0]["relabelings"][0]
    assert relabel["sourceLabels"] == ["__meta_kubernetes_pod_container_name"]


def test_embedded_mode_without_persistence_uses_a_bounded_emptydir(helm_bin: str) -> None:
    objects = render(
        helm_bin, "-f", str(EMBEDDED_VALUES), "--set", "store.embedded.persistence.enabled=false"
    )
    pod = pod_spec(by_kind(objects, "Deployment")["conveyor-embedded"])
    store = {v["name"]: v for v in pod["volumes"]}["store"]
    assert store == {"name": "store", "emptyDir": {"sizeLimit": "2Gi"}}
    assert "conveyor-store" not in by_kind(objects, "PersistentVolumeClaim")


# --- secrets -------------------------------------------------------------------------------------


def _assert_secrets_only_by_reference(objects: Objects) -> None:
    for workload in _workloads(objects):
        for c in containers(workload):
            for name, entry in env_by_name(c).items():
                if name in SECRET_ENV | {"CONVEYOR_KAFKA_SASL_PASSWORD"}:
                    if "value" in entry:  # only the embedded pod's local SQLite path
                        assert entry["value"].startswith("sqlite:////"), (name, entry)
                    else:
                        assert "secretKeyRef" in entry["valueFrom"], (name, entry)


@pytest.mark.parametrize("values", ["minimal", "full", "embedded", "trial"])
def test_credentials_reach_pods_only_through_secret_key_refs(helm_bin: str, values: str) -> None:
    args = {
        "minimal": ("-f", str(MINIMAL_VALUES)),
        "full": ("-f", str(FULL_VALUES)),
        "embedded": ("-f", str(EMBEDDED_VALUES)),
        "trial": TRIAL_SECRETS,
    }[values]
    objects = render(helm_bin, *args)
    _assert_secrets_only_by_reference(objects)
    if values == "trial":
        # The chart-created Secret is the only object that holds them.
        for obj in objects:
            text = yaml.safe_dump(obj)
            holds = any(s in text for s in ("pa55word", "tok-3f9a", "c2VjcmV0LXZhbHVl"))
            assert holds == (obj["kind"] == "Secret"), obj["metadata"]["name"]


def test_each_service_gets_exactly_the_secrets_it_needs(minimal: Objects) -> None:
    deployments = by_kind(minimal, "Deployment")
    wanted = {
        "gateway": {"CONVEYOR_STORE_URL", "CONVEYOR_GATEWAY_TOKENS"},
        "notify": {"CONVEYOR_STORE_URL", "CONVEYOR_WEBHOOK_SECRETS"},
        "writeback": {"CONVEYOR_STORE_URL"},
    }
    for service in SERVICES:
        variables = env_by_name(sole_container(deployments[f"conveyor-{service}"]))
        assert SECRET_ENV & set(variables) == wanted.get(service, set()), service
        for name in wanted.get(service, set()):
            ref = variables[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "conveyor-app" and "optional" not in ref, (service, name)


def test_secret_keys_and_env_names_are_adjustable(helm_bin: str) -> None:
    objects = render(
        helm_bin,
        "-f",
        str(MINIMAL_VALUES),
        "--set",
        "secrets.gatewayTokens.env=CONVEYOR_GATEWAY_TOKEN_MAP",
        "--set",
        "secrets.gatewayTokens.key=tokens.json",
        "--set",
        "secrets.webhookSecrets.env=CONVEYOR_WEBHOOK_SIGNING_SECRETS",
    )
    deployments = by_kind(objects, "Deployment")
    gateway = env_by_name(sole_container(deployments["conveyor-gateway"]))
    assert gateway["CONVEYOR_GATEWAY_TOKEN_MAP"]["valueFrom"]["secretKeyRef"] == {
        "name": "conveyor-app",
        "key": "tokens.json",
    }
    assert "CONVEYOR_GATEWAY_TOKENS" not in gateway
    notify = env_by_name(sole_container(deployments["conveyor-notify"]))
    assert "CONVEYOR_WEBHOOK_SIGNING_SECRETS" in notify
    test_pod = env_by_name(sole_container(by_kind(objects, "Pod")["conveyor-test"]))
    assert test_pod["CONVEYOR_TEST_GATEWAY_TOKENS"]["valueFrom"]["secretKeyRef"]["key"] == (
        "tokens.json"
    )


# --- image ---------------------------------------------------------------------------------------


def test_default_image_is_the_published_one_at_the_chart_version(minimal: Objects) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    images = {c["image"] for w in _workloads(minimal) for c in containers(w)}
    assert images == {f"conveyor-pipeline/conveyor:{chart['appVersion']}"}


def test_a_digest_pins_the_image(full: Objects) -> None:
    images = {c["image"] for w in _workloads(full) for c in containers(w)}
    assert images == {"images.example/ml/conveyor@sha256:" + "0123456789abcdef" * 4}


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("--set", "image.digest=sha256:abc"), "/image/digest"),
        (("--set", "networkPolicy.egres[0].to=x"), "egres"),
        (("--set", "inference.podDisruptionBudget.maxUnavailable=1"), "/inference/podDisrupt"),
        (("--set", "secrets.values.storeUrl=sqlite:////tmp/x.db"), "/secrets/values/storeUrl"),
        (("--set", "secrets.gatewayTokens.env=bad-name"), "/secrets/gatewayTokens/env"),
        (("--set", "gateway.ingress.hosts[0].paths[0].path=v1"), "/gateway/ingress/hosts"),
        (("--set", "tests.kind=dance"), "/tests/kind"),
    ],
    ids=[
        "short-digest",
        "unknown-networkpolicy-key",
        "pdb-with-both-bounds",
        "sqlite-url-outside-embedded-mode",
        "env-name-not-a-variable",
        "relative-ingress-path",
        "unknown-test-kind",
    ],
)
def test_values_schema_rejects_bad_new_values(
    helm_bin: str, args: tuple[str, ...], complaint: str
) -> None:
    proc = template(helm_bin, "-f", str(MINIMAL_VALUES), *args)
    assert proc.returncode != 0, f"helm accepted {args}"
    assert "schema" in proc.stderr and complaint in proc.stderr, proc.stderr


def test_every_value_is_covered_by_the_schema() -> None:
    """values.schema.json describes every key of values.yaml (no block left open)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    definitions = schema["definitions"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = definitions[node["$ref"].rsplit("/", 1)[-1]]
        return node

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        node = resolve(node)
        if not isinstance(value, dict) or not value:
            return
        props = node.get("properties", {})
        if not props:  # free-form maps (labels, env, affinity) are typed by additionalProperties
            assert "additionalProperties" in node or node.get("type") == "object", path
            return
        assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
        for key, child in value.items():
            assert key in props, f"{path}.{key} is not in values.schema.json"
            walk(child, props[key], f"{path}.{key}")

    walk(values, schema, "values")


# --- pods: storage, scheduling, disruption -------------------------------------------------------


def test_every_pod_bounds_its_ephemeral_storage(minimal: Objects, embedded: Objects) -> None:
    for objects in (minimal, embedded):
        for workload in _workloads(objects):
            pod = pod_spec(workload)
            for c in pod["containers"]:
                resources = c["resources"]
                assert "ephemeral-storage" in resources["requests"], c["name"]
                assert "ephemeral-storage" in resources["limits"], c["name"]
            for volume in pod["volumes"]:
                if "emptyDir" in volume:
                    assert volume["emptyDir"].get("sizeLimit"), (workload["metadata"], volume)


def test_inference_never_takes_its_only_replica_down(minimal: Objects) -> None:
    deployment = by_kind(minimal, "Deployment")["conveyor-inference"]
    assert deployment["spec"]["replicas"] == 1
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 1, "maxUnavailable": 0}
    budget = by_kind(minimal, "PodDisruptionBudget")["conveyor-inference"]["spec"]
    assert budget["minAvailable"] == 1 and "maxUnavailable" not in budget
    # The other services keep the chart-wide budget.
    assert by_kind(minimal, "PodDisruptionBudget")["conveyor-notify"]["spec"]["maxUnavailable"] == 1


def test_topology_spread_gets_each_services_own_selector(minimal: Objects, full: Objects) -> None:
    for name, deployment in by_kind(minimal, "Deployment").items():
        spread = pod_spec(deployment)["topologySpreadConstraints"]
        assert [c["topologyKey"] for c in spread] == [
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
        ]
        for constraint in spread:
            labels = constraint["labelSelector"]["matchLabels"]
            assert labels["app.kubernetes.io/component"] == name.removeprefix("conveyor-")
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
    inference = pod_spec(by_kind(full, "Deployment")["conveyor-inference"])
    assert [c["whenUnsatisfiable"] for c in inference["topologySpreadConstraints"]] == [
        "DoNotSchedule"
    ]


def test_gpu_inference_gets_its_runtime_class_priority_and_model_cache(full: Objects) -> None:
    deployments = by_kind(full, "Deployment")
    inference = pod_spec(deployments["conveyor-inference"])
    assert inference["runtimeClassName"] == "nvidia"
    assert inference["priorityClassName"] == "conveyor-gpu"
    volumes = {v["name"]: v for v in inference["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "conveyor-model-cache"
    mounts = {m["name"]: m["mountPath"] for m in inference["containers"][0]["volumeMounts"]}
    assert mounts["model-cache"] == "/var/lib/conveyor/.cache"
    claim = by_kind(full, "PersistentVolumeClaim")["conveyor-model-cache"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for name in ("conveyor-notify", "conveyor-gateway"):
        pod = pod_spec(deployments[name])
        assert pod["priorityClassName"] == "conveyor", name
        assert "runtimeClassName" not in pod, name


# --- optional objects ----------------------------------------------------------------------------


def test_hpa_scales_what_keda_does_not(helm_bin: str, kv: ModuleType, full: Objects) -> None:
    assert sorted(by_kind(full, "HorizontalPodAutoscaler")) == ["conveyor-gateway"]
    objects = render(helm_bin, "-f", str(MINIMAL_VALUES), "--set", "hpa.enabled=true")
    validate_builtin(kv, objects)
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    assert sorted(hpas) == sorted(f"conveyor-{s}" for s in SERVICES)
    for name, deployment in by_kind(objects, "Deployment").items():
        assert "replicas" not in deployment["spec"], f"{name}: the HPA owns replicas"
        assert hpas[name]["spec"]["scaleTargetRef"]["name"] == name
    assert hpas["conveyor-gateway"]["spec"]["minReplicas"] == 2


def test_ingress_routes_to_the_gateway_service(full: Objects) -> None:
    (ingress,) = by_kind(full, "Ingress").values()
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/v1"
    assert path["backend"]["service"] == {"name": "conveyor-gateway", "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["secretName"] == "conveyor-tls"


def test_network_policy_opens_only_the_metrics_and_gateway_ports(full: Objects) -> None:
    (policy,) = by_kind(full, "NetworkPolicy").values()
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    metrics, gateway = spec["ingress"]
    assert metrics["ports"] == [{"port": 9100, "protocol": "TCP"}]
    assert metrics["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert gateway["ports"] == [{"port": 8080, "protocol": "TCP"}]
    # ingress-nginx, and the release's own pods (the helm test pod polls the gateway).
    assert len(gateway["from"]) == 2
    assert gateway["from"][1]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "conveyor",
        "app.kubernetes.io/instance": "conveyor",
    }
    assert {"port": 53, "protocol": "UDP"} in spec["egress"][0]["ports"]


def test_prometheus_rule_carries_the_shipped_alert_rules(full: Objects) -> None:
    (rule,) = by_kind(full, "PrometheusRule").values()
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())


def test_dashboard_configmap_carries_the_dashboard_for_the_sidecar(full: Objects) -> None:
    configmap = by_kind(full, "ConfigMap")["conveyor-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Conveyor"}
    assert json.loads(configmap["data"]["conveyor-dashboard.json"]) == json.loads(
        DASHBOARD.read_text()
    )


def test_helm_test_pod_submits_a_task_and_polls_the_gateway(
    minimal: Objects, tmp_path: Path
) -> None:
    pod = by_kind(minimal, "Pod")["conveyor-test"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    c = sole_container(pod)
    assert c["command"][:2] == ["python", "-c"]
    script = tmp_path / "helm_test.py"
    script.write_text(c["command"][2])
    py_compile.compile(str(script), doraise=True)
    assert "conveyor" in c["command"][2] and '"submit"' in c["command"][2]
    variables = env_by_name(c)
    assert variables["CONVEYOR_TEST_GATEWAY_URL"]["value"] == "http://conveyor-gateway:8080"
    assert variables["CONVEYOR_TEST_KIND"]["value"] == "embed"
    assert c["envFrom"] == [{"configMapRef": {"name": "conveyor"}}]


def test_helm_test_without_gateway_polls_the_store(helm_bin: str) -> None:
    objects = render(helm_bin, "-f", str(MINIMAL_VALUES), "--set", "gateway.enabled=false")
    variables = env_by_name(sole_container(by_kind(objects, "Pod")["conveyor-test"]))
    assert "CONVEYOR_TEST_GATEWAY_URL" not in variables
    assert variables["CONVEYOR_STORE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "store-url"


def test_keda_leaves_the_embedded_stages_alone(helm_bin: str) -> None:
    objects = render(helm_bin, "-f", str(EMBEDDED_VALUES), "--set", "keda.enabled=true")
    scaled = by_kind(objects, "ScaledObject")
    assert sorted(scaled) == sorted(f"conveyor-{s}" for s in STAGES if s not in STORE_SERVICES)


def test_model_list_reaches_every_service_that_checks_model_names(helm_bin: str) -> None:
    # The gateway refuses an unknown model at the edge (422), so it must know the same list as
    # preprocess and inference, or valid custom models would be refused there.
    models = [{"name": "gen-b", "kind": "generate", "source": "/models/gen-b"}]
    objects = render(helm_bin, *TRIAL_SECRETS, "--set-json", f"config.models={json.dumps(models)}")
    deployments = by_kind(objects, "Deployment")
    for service in SERVICES:
        variables = env_by_name(sole_container(deployments[f"conveyor-{service}"]))
        wanted = service in ("preprocess", "inference", "gateway")
        assert ("CONVEYOR_MODELS" in variables) == wanted, service
        if wanted:
            assert json.loads(variables["CONVEYOR_MODELS"]["value"]) == models, service


def test_webhook_allowlist_reaches_notify_and_the_gateway(helm_bin: str) -> None:
    # notify's destination policy and the gateway's callback_url check read the same list.
    objects = render(helm_bin, *TRIAL_SECRETS, "--set-json", 'config.webhookAllow=["10.8.0.0/16"]')
    (config,) = [
        o
        for o in by_kind(objects, "ConfigMap").values()
        if "CONVEYOR_RETRY_DELAYS" in o.get("data", {})
    ]
    assert json.loads(config["data"]["CONVEYOR_WEBHOOK_ALLOW"]) == ["10.8.0.0/16"]
    default = render(helm_bin, *TRIAL_SECRETS)
    for obj in by_kind(default, "ConfigMap").values():
        assert "CONVEYOR_WEBHOOK_ALLOW" not in obj.get("data", {})


MODELS = [
    {"name": "stable", "kind": "embed", "source": "/models/minilm", "weight": 90},
    {
        "name": "canary",
        "kind": "embed",
        "source": "/models/minilm",
        "dtype": "bfloat16",
        "weight": 10,
    },
]


def test_a_models_file_is_mounted_outside_the_config_checksum(
    helm_bin: str, kv: ModuleType
) -> None:
    # `conveyor variants set` and the services' reload work on a file: with modelsFile the list
    # is a ConfigMap mounted in the three services that read it, and changing a weight must not
    # roll any pod (it is in no checksum), so the reload is what applies it.
    args = (*TRIAL_SECRETS, "--set-json", f"config.models={json.dumps(MODELS)}")
    objects = render(helm_bin, *args, "--set", "config.modelsFile=true")
    validate_builtin(kv, objects)
    configmap = by_kind(objects, "ConfigMap")["conveyor-models"]
    assert json.loads(configmap["data"]["models.json"]) == MODELS
    deployments = by_kind(objects, "Deployment")
    for service in SERVICES:
        deployment = deployments[f"conveyor-{service}"]
        variables = env_by_name(sole_container(deployment))
        mounts = {m["name"]: m for m in sole_container(deployment).get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod_spec(deployment).get("volumes", [])}
        wanted = service in ("preprocess", "inference", "gateway")
        assert "CONVEYOR_MODELS" not in variables, service
        assert ("CONVEYOR_MODELS_FILE" in variables) == wanted, service
        assert ("models" in mounts) == wanted == ("models" in volumes), service
        if wanted:
            path = variables["CONVEYOR_MODELS_FILE"]["value"]
            assert path == f"{mounts['models']['mountPath']}/models.json", service
            assert mounts["models"]["readOnly"] is True
            assert volumes["models"]["configMap"]["name"] == "conveyor-models"
    reweighted = [dict(MODELS[0], weight=0), dict(MODELS[1], weight=100)]
    changed = render(
        helm_bin,
        *TRIAL_SECRETS,
        "--set-json",
        f"config.models={json.dumps(reweighted)}",
        "--set",
        "config.modelsFile=true",
    )
    before = {n: d["spec"]["template"]["metadata"] for n, d in deployments.items()}
    after = {
        n: d["spec"]["template"]["metadata"] for n, d in by_kind(changed, "Deployment").items()
    }
    assert before == after  # no pod rolls: the reload applies the new weights
    assert by_kind(changed, "ConfigMap")["conveyor-models"] != configmap


def test_a_models_file_without_models_is_refused(helm_bin: str) -> None:
    proc = template(helm_bin, *TRIAL_SECRETS, "--set", "config.modelsFile=true")
    assert proc.returncode != 0
    assert "config.models is empty" in proc.stderr


def test_reuse_gives_inference_the_store_and_is_refused_with_the_embedded_store(
    helm_bin: str,
) -> None:
    objects = render(helm_bin, *TRIAL_SECRETS, "--set", "config.reuse.enabled=true")
    deployments = by_kind(objects, "Deployment")
    inference = env_by_name(sole_container(deployments["conveyor-inference"]))
    assert inference["CONVEYOR_REUSE"]["value"] == "true"
    assert float(inference["CONVEYOR_REUSE_TTL_S"]["value"]) == 86400
    ref = inference["CONVEYOR_STORE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == "store-url"
    for service in ("preprocess", "moderation"):
        variables = env_by_name(sole_container(deployments[f"conveyor-{service}"]))
        assert not {"CONVEYOR_STORE_URL", "CONVEYOR_REUSE"} & set(variables), service
    default = by_kind(render(helm_bin, *TRIAL_SECRETS), "Deployment")
    plain = env_by_name(sole_container(default["conveyor-inference"]))
    assert not {"CONVEYOR_STORE_URL", "CONVEYOR_REUSE"} & set(plain)
    proc = template(helm_bin, "-f", str(EMBEDDED_VALUES), "--set", "config.reuse.enabled=true")
    assert proc.returncode != 0
    assert "needs the shared PostgreSQL store" in proc.stderr
