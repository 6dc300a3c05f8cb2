"""Rendering of the local broker's configuration files: `server.properties` and a log4j2 config.

A `BrokerConfig` is a frozen value (ports, data directory, a few limits); the render functions turn
it into the text Kafka reads. Nothing here starts a process (`conveyor.net.free_ports` asks the OS
for ports), so unit tests can check every setting without Java. Each setting carries a comment
saying why a single-node development broker needs it (most Kafka defaults assume a three-node
cluster).
"""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

# 4 MiB: the largest record batch the broker accepts. Kafka's own default is ~1 MiB, which a batch
# of generated texts or embeddings can approach; 4 MiB leaves headroom while staying well below
# what a 512 MiB heap can buffer per request. Clients still apply their own limit first
# (librdkafka's producer `message.max.bytes` defaults to 1,000,000), and the runtime rejects
# oversize payloads as permanent errors before they reach the broker.
DEFAULT_MESSAGE_MAX_BYTES = 4 * 1024 * 1024
# Partitions of a topic created without an explicit count: enough to exercise per-partition
# ordering and rebalances in tests, few enough to keep the broker's file handles and start cheap.
DEFAULT_NUM_PARTITIONS = 3
# The log cleaner allocates this buffer at start; Kafka's 128 MiB default would take a quarter of
# the 512 MiB heap and can kill the broker with OutOfMemoryError. 16 MiB suits compacted topics.
CLEANER_DEDUPE_BUFFER_BYTES = 16 * 1024 * 1024
# Name of the broker's log4j2 log file inside the data directory (read for error tails).
BROKER_LOG_NAME = "broker.log"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Everything that varies between local broker instances."""

    data_dir: Path
    broker_port: int
    controller_port: int
    host: str = "127.0.0.1"  # never "localhost": it may resolve to ::1 while we bind IPv4 only
    node_id: int = 1
    num_partitions: int = DEFAULT_NUM_PARTITIONS
    message_max_bytes: int = DEFAULT_MESSAGE_MAX_BYTES

    @property
    def bootstrap(self) -> str:
        """The client bootstrap address, `host:port` of the PLAINTEXT listener."""
        return f"{self.host}:{self.broker_port}"

    @property
    def controller_address(self) -> str:
        return f"{self.host}:{self.controller_port}"

    @property
    def log_dir(self) -> Path:
        """Where Kafka keeps partitions and the KRaft metadata log."""
        return self.data_dir / "kraft-logs"

    @property
    def server_properties_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log4j_path(self) -> Path:
        return self.data_dir / "log4j2.properties"

    @property
    def log_file(self) -> Path:
        return self.data_dir / BROKER_LOG_NAME


def new_cluster_id() -> str:
    """16 random bytes, base64url without padding: the usual form of a KRaft cluster id.

    Never starting with "-": the format tool's argument parser would read `-t -Xy...` as an option
    and exit 1 (1 id in 64 would; Kafka's own Uuid.toString avoids it the same way).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def server_settings(config: BrokerConfig) -> dict[str, str]:
    """The broker settings as an ordered mapping (also what the unit tests inspect)."""
    plain = f"PLAINTEXT://{config.bootstrap}"
    controller = f"CONTROLLER://{config.controller_address}"
    return {
        # One process is both broker and the only KRaft controller (no ZooKeeper in Kafka 4.x).
        "process.roles": "broker,controller",
        "node.id": str(config.node_id),
        # Dynamic quorum (KIP-853) bootstrapped by `StorageTool format --standalone`;
        # `controller.quorum.voters` must stay unset or `--standalone` is rejected.
        "controller.quorum.bootstrap.servers": config.controller_address,
        "listeners": f"{plain},{controller}",
        "advertised.listeners": f"{plain},{controller}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(config.log_dir),
        # Topics come from `conveyor topics apply`/tests; a typo must fail, not create a topic.
        "auto.create.topics.enable": "false",
        "num.partitions": str(config.num_partitions),
        # One node: every replication factor is 1 and min ISR 1, or creating internal topics,
        # joining groups and `init_transactions()` hang waiting for replicas that never come.
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        # Kafka creates 50 __consumer_offsets partitions on the first group join; 3 is faster.
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        # 50 __transaction_state partitions by default, created on the first init_transactions().
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "share.coordinator.state.topic.num.partitions": "1",
        # The default 3 s delay before the first rebalance only helps large groups join together;
        # in tests it adds 3 s to every new consumer group.
        "group.initial.rebalance.delay.ms": "0",
        "log.cleaner.dedupe.buffer.size": str(CLEANER_DEDUPE_BUFFER_BYTES),
        # After a crash (kill -9) the restarted broker cannot register until the controller expires
        # the dead incarnation's session: 9 s by default. Heartbeats stay inside one process over
        # loopback, so a 3 s session (heartbeat every 0.5 s) is safe and makes chaos restarts fast.
        "broker.session.timeout.ms": "3000",
        "broker.heartbeat.interval.ms": "500",
        "message.max.bytes": str(config.message_max_bytes),
    }


def _escape(value: str) -> str:
    """Escape a value for the Java properties format (backslashes and line breaks)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def render_server_properties(config: BrokerConfig) -> str:
    """The text of `server.properties` for `config`."""
    lines = ["# Generated by conveyor.broker.config; edits are overwritten on start."]
    lines += [f"{key}={_escape(value)}" for key, value in server_settings(config).items()]
    return "\n".join(lines) + "\n"


def render_log4j2(config: BrokerConfig) -> str:
    """A log4j2 properties config: INFO to a size-rolled file in the data directory.

    The properties format needs no extra jar (YAML/JSON would need Jackson modules). The file rolls
    at 10 MB keeping 3 files so a long-running detached broker cannot fill the disk.
    """
    log_file = _escape(str(config.log_file))
    return "\n".join(
        [
            "status = warn",
            "name = conveyor-local-kafka",
            "appender.file.type = RollingFile",
            "appender.file.name = file",
            f"appender.file.fileName = {log_file}",
            f"appender.file.filePattern = {log_file}.%i",
            "appender.file.layout.type = PatternLayout",
            "appender.file.layout.pattern = [%d] %p %m (%c)%n",
            "appender.file.policies.type = Policies",
            "appender.file.policies.size.type = SizeBasedTriggeringPolicy",
            "appender.file.policies.size.size = 10MB",
            "appender.file.strategy.type = DefaultRolloverStrategy",
            "appender.file.strategy.max = 3",
            "rootLogger.level = INFO",
            "rootLogger.appenderRef.file.ref = file",
            # Per-partition state changes and per-request logs are noise at INFO in tests.
            "logger.state.name = state.change.logger",
            "logger.state.level = WARN",
            "logger.request.name = kafka.request.logger",
            "logger.request.level = WARN",
            "",
        ]
    )


def ports_from_properties(text: str) -> tuple[int, int] | None:
    """(broker port, controller port) from a rendered server.properties, or None if absent.

    A formatted data directory is bound to its controller address (the KRaft voter set written at
    format time), so a broker restarted on an existing directory must reuse these ports.
    """
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "listeners":
            ports = dict(re.findall(r"(PLAINTEXT|CONTROLLER)://[^,]*:(\d+)", value))
            if "PLAINTEXT" in ports and "CONTROLLER" in ports:
                return int(ports["PLAINTEXT"]), int(ports["CONTROLLER"])
    return None


def write_config_files(config: BrokerConfig) -> None:
    """Write server.properties and the log4j2 config into the data directory."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    config.server_properties_path.write_text(render_server_properties(config), encoding="utf-8")
    config.log4j_path.write_text(render_log4j2(config), encoding="utf-8")
