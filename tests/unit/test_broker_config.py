"""The local broker's server.properties and jar cache, checked without Java or a broker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conveyor.broker import jars
from conveyor.broker.config import (
    BrokerConfig,
    new_cluster_id,
    ports_from_properties,
    render_log4j2,
    render_server_properties,
)


def parse_properties(text: str) -> dict[str, str]:
    """Minimal Java-properties reader: `key=value` lines, `#` comments, `\\\\` unescaped."""
    pairs = [line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")]
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), "a setting is rendered twice"
    return {key: value.replace("\\\\", "\\") for key, value in pairs}


@pytest.fixture
def config(tmp_path: Path) -> BrokerConfig:
    return BrokerConfig(tmp_path / "data", broker_port=19092, controller_port=19093)


@pytest.fixture
def props(config: BrokerConfig) -> dict[str, str]:
    return parse_properties(render_server_properties(config))


def test_every_replication_setting_fits_a_single_node(props: dict[str, str]) -> None:
    for key in (
        "default.replication.factor",
        "min.insync.replicas",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "share.coordinator.state.topic.min.isr",
    ):
        assert props[key] == "1", key


def test_internal_topics_get_few_partitions_for_a_fast_first_join(props: dict[str, str]) -> None:
    assert int(props["offsets.topic.num.partitions"]) <= 3
    assert int(props["transaction.state.log.num.partitions"]) == 1


def test_listeners_bind_ipv4_loopback_on_the_chosen_ports(
    config: BrokerConfig, props: dict[str, str]
) -> None:
    expected = "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["listeners"] == props["advertised.listeners"] == expected
    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert config.bootstrap == "127.0.0.1:19092"
    assert "localhost" not in render_server_properties(config)


def test_combined_kraft_node_uses_a_standalone_dynamic_quorum(props: dict[str, str]) -> None:
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert "controller.quorum.voters" not in props  # `format --standalone` rejects it


def test_development_defaults(props: dict[str, str]) -> None:
    assert props["auto.create.topics.enable"] == "false"
    assert props["num.partitions"] == "3"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["log.cleaner.dedupe.buffer.size"] == str(16 * 1024 * 1024)
    assert props["message.max.bytes"] == str(4 * 1024 * 1024)
    assert int(props["broker.heartbeat.interval.ms"]) < int(props["broker.session.timeout.ms"])


def test_limits_and_paths_follow_the_config(tmp_path: Path) -> None:
    config = BrokerConfig(
        tmp_path / "dir with space", 1, 2, num_partitions=5, message_max_bytes=1_000_000
    )
    props = parse_properties(render_server_properties(config))
    assert (props["num.partitions"], props["message.max.bytes"]) == ("5", "1000000")
    assert props["log.dirs"] == str(tmp_path / "dir with space" / "kraft-logs")


def test_backslashes_in_paths_are_escaped_for_java() -> None:
    config = BrokerConfig(Path("C:\\kafka"), 1, 2)
    assert "log.dirs=C:\\\\kafka" in render_server_properties(config)


def test_ports_are_read_back_from_a_rendered_file(config: BrokerConfig) -> None:
    assert ports_from_properties(render_server_properties(config)) == (19092, 19093)
    assert ports_from_properties("num.partitions=3\n") is None


def test_cluster_ids_never_look_like_command_line_options() -> None:
    ids = {new_cluster_id() for _ in range(2000)}  # ~31 would start with "-" if unguarded
    assert len(ids) == 2000
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{21}", cid) for cid in ids)


def test_log4j_config_writes_the_broker_log_into_the_data_dir(config: BrokerConfig) -> None:
    text = render_log4j2(config)
    assert f"appender.file.fileName = {config.data_dir / 'broker.log'}" in text
    assert "rootLogger.level = INFO" in text  # "Kafka Server started" is logged at INFO


def test_jar_cache_lives_under_conveyor_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVEYOR_KAFKA_LIBS", raising=False)
    monkeypatch.setenv("CONVEYOR_HOME", str(tmp_path))
    version = jars.kafka_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert jars.libs_dir() == tmp_path / ".cache" / "kafka" / version / "libs"
    monkeypatch.setenv("CONVEYOR_KAFKA_LIBS", str(tmp_path / "elsewhere"))
    assert jars.libs_dir() == tmp_path / "elsewhere"


def test_completed_jar_cache_is_reused_without_maven(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_KAFKA_LIBS", str(tmp_path / "libs"))
    (tmp_path / "libs").mkdir()
    digest = jars._pom_digest(jars.POM_PATH)
    (tmp_path / "libs" / jars.MARKER_NAME).write_text(f"{digest} 46 jars\n")
    monkeypatch.setattr("shutil.which", lambda _name: pytest.fail("looked for mvn"))
    assert jars.ensure_jars() == tmp_path / "libs"


def test_missing_maven_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_KAFKA_LIBS", str(tmp_path / "libs"))
    monkeypatch.setattr("shutil.which", lambda _name: None)
    with pytest.raises(jars.BrokerSetupError, match="mvn not found"):
        jars.ensure_jars()
