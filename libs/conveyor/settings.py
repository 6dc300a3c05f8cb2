"""Settings shared by every stage: Kafka connection and the stage runtime's knobs.

Frozen pydantic-settings classes read once at start from the environment (`CONVEYOR_*`).
Each service's settings class extends `StageSettings` with its own fields. Lists and maps are
given as JSON in the environment (e.g. `CONVEYOR_RETRY_DELAYS='[1, 10, 60]'`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from conveyor.events.ingress import TaskRules

# No setting's validation error may echo its input: a malformed token map or password would
# otherwise land in the log of the process that failed to start.
_CONFIG = SettingsConfigDict(
    env_prefix="CONVEYOR_", frozen=True, extra="ignore", hide_input_in_errors=True
)
SETTINGS_CONFIG = _CONFIG  # for settings mixins defined next to their feature


class KafkaSettings(BaseSettings):
    """How to reach the Kafka cluster (SASL/TLS for production clusters)."""

    model_config = _CONFIG

    kafka_bootstrap: str = Field(default="127.0.0.1:9092", description="bootstrap.servers")
    kafka_security_protocol: str = Field(
        default="PLAINTEXT", description="PLAINTEXT|SSL|SASL_SSL|..."
    )
    kafka_sasl_mechanism: str | None = Field(default=None, description="e.g. SCRAM-SHA-512")
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = Field(
        default=None, description="SASL password (a secret: never logged or printed)"
    )
    kafka_ssl_ca_location: str | None = None
    kafka_extra: dict[str, str] = Field(
        default_factory=dict,
        repr=False,  # may carry credentials (ssl.key.password, ...): never printed
        description="extra librdkafka properties, JSON object",
    )
    topic_prefix: str = Field(default="", description="prepended to every topic name")

    def topic(self, name: str) -> str:
        return self.topic_prefix + name

    def stage_group(self, stage: str) -> str:
        """The consumer group a stage's instances share unless `CONVEYOR_GROUP_ID` names one."""
        return f"{self.topic_prefix}conveyor.{stage}"


class StageSettings(KafkaSettings):
    """The stage runtime: batching, retries, dead letters, delivery, health and metrics."""

    stage: str = Field(default="", description="stage name; set by each service")
    group_id: str | None = Field(
        default=None, description="consumer group; default conveyor.<stage>"
    )
    batch_max: int = Field(default=500, ge=1, description="records taken per poll")
    batch_wait_ms: int = Field(
        default=0,
        ge=0,
        description="after the first record, wait this long for more (dynamic batching)",
    )
    poll_timeout_ms: int = Field(default=100, ge=1, description="idle poll; bounds timer latency")
    retry_delays: list[float] = Field(
        default_factory=lambda: [1.0, 10.0, 60.0], description="seconds per retry rung"
    )
    max_record_bytes: int = Field(
        default=1_000_000, ge=1024, description="larger input records are dead-lettered"
    )
    exactly_once: bool = Field(
        default=False, description="Kafka transactions: consume-produce-commit"
    )
    instance_slot: str | None = Field(
        default=None,
        description="stable name of this instance's slot (StatefulSet pod, supervisor label); "
        "exactly-once uses transactional.id <group>.<slot> so a restart fences its "
        "predecessor's open transaction; default: the per-start instance id",
    )
    pipelined: bool = Field(
        default=False,
        description="run the handler on a worker thread while the loop keeps polling, "
        "producing and committing (slow stages: inference)",
    )
    max_in_flight: int = Field(
        default=1000,
        ge=1,
        description="pipelined: records taken but not yet handled before the stage pauses its "
        "partitions",
    )
    priority_lanes: bool = Field(
        default=False, description="serve high before normal before low lane (inference)"
    )
    lane_starvation_s: float = Field(
        default=2.0, gt=0, description="a lane held back this long is served for one poll"
    )
    fair_share: bool = Field(
        default=False,
        description="pipelined: serve tenants by deficit round robin within each lane from a "
        "read-ahead window instead of partition order (inference)",
    )
    fair_window: int = Field(
        default=4096, ge=1, description="fair share: records read ahead (pause at the bound)"
    )
    fair_window_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="fair share: bytes read ahead"
    )
    tenant_weights: dict[str, float] = Field(
        default_factory=dict,
        description="fair share: weight per tenant, JSON object (default_tenant_weight else)",
    )
    quota_hold: bool = Field(
        default=False,
        description="fair share: hold a tenant's tasks in the window while it is over its "
        "quota (CONVEYOR_TENANT_QUOTAS, CONVEYOR_QUOTA_IN_FLIGHT; conveyor.quota)",
    )
    default_tenant_weight: float = Field(default=1.0, gt=0, description="fair share weight")
    cancel_watch: bool = Field(
        default=True,
        description="follow the cancel topic and skip cancelled tasks' records "
        "(docs/cancellation.md)",
    )
    linger_ms: float = Field(
        default=0.0,
        ge=0,
        description="producer linger: 0 sends at once (latency per hop); batches still form "
        "under load, while earlier requests are in flight",
    )
    commit_interval_ms: float = Field(
        default=100.0,
        ge=0,
        description="while records flow, acknowledged offsets are committed at most this "
        "often (an idle stage, a revoke and a stop commit at once); a crash redelivers what "
        "was acknowledged since, never loses it",
    )
    delivery_timeout_s: float = Field(default=30.0, gt=0, description="max wait for broker acks")
    metrics_host: str = Field(
        default="127.0.0.1", description="bind address of /metrics and /healthz"
    )
    metrics_port: int = Field(default=0, ge=0, description="0 picks a free port")
    health_stall_s: float = Field(
        default=30.0,
        gt=0,
        description="/healthz fails if the loop makes no progress (no turn, no record "
        "handled) for this long",
    )
    broker_down_s: float = Field(
        default=60.0,
        gt=0,
        description="/healthz fails once every Kafka broker has been unreachable this long",
    )

    @property
    def group(self) -> str:
        return self.group_id or self.stage_group(self.stage)


def default_store_url() -> str:
    from conveyor.paths import var_dir

    return f"sqlite:///{var_dir() / 'conveyor.db'}"


def store_url_field() -> SecretStr:
    """The `store_url` setting of every service that opens the store: a secret, since a
    PostgreSQL URL may carry a password."""
    return Field(
        default_factory=lambda: SecretStr(default_store_url()),
        description="result store URL: sqlite:///path or postgresql://user:password@host/db",
    )


class StoreSettings(BaseSettings):
    """Where results and timelines live: `sqlite:///path` (default) or `postgresql://...`."""

    model_config = _CONFIG

    store_url: SecretStr = store_url_field()


DEFAULT_TEMPLATES = {
    "plain": "{input}",
    "summarize": "Summarize the following text in one sentence.\n\n{input}",
    "answer": "Answer the question briefly and factually.\n\nQuestion: {input}",
    "translate-fr": "Translate into French:\n\n{input}",
}


class CatalogSettings(BaseSettings):
    """What the pipeline can run: prompt templates (preprocess) and models (inference).

    Preprocess applies them; the gateway and `conveyor submit` read the same variables
    (`CONVEYOR_TEMPLATES`, `CONVEYOR_MODELS`) to refuse an unknown template or model at once.
    """

    model_config = _CONFIG

    templates: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_TEMPLATES),
        description="template id -> text with an {input} placeholder (JSON)",
    )
    default_template: str = "plain"
    models: str | None = Field(default=None, description="model registry JSON (CONVEYOR_MODELS)")
    models_file: str | None = Field(
        default=None,
        description="model registry JSON file, read instead of `models`; variant weights "
        "follow it without a restart (docs/variants.md)",
    )

    def task_rules(self) -> TaskRules:
        from conveyor.events.ingress import TaskRules
        from conveyor.ml.registry import load_specs

        names: dict[str, set[str]] = {}
        for spec in load_specs(self.models, self.models_file):
            names.setdefault(spec.kind, set()).add(spec.name)
        return TaskRules(
            templates=frozenset(self.templates),
            models={kind: frozenset(found) for kind, found in names.items()},
        )
