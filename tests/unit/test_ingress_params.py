"""The ingress contract's typed params, rules and limits, as every edge applies them: the model
itself, preprocess (Kafka producers), `conveyor submit`; and the private modes of created files."""

from __future__ import annotations

import logging
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conveyor.cli.main import build_parser
from conveyor.cli.tasks import _tasks
from conveyor.events.ingress import InvalidTaskError, TaskRules, parse_task
from conveyor.events.model import Event
from conveyor.events.params import MAX_SEED
from conveyor.runtime.typed import Context
from conveyor.services.preprocess.handler import PreprocessResources, word_count
from conveyor.services.preprocess.settings import PreprocessSettings
from conveyor.settings import CatalogSettings
from conveyor.store import open_store
from tests.stages import preprocess

BASE = {"task_id": "t-1", "tenant": "acme", "kind": "generate", "input": "hi"}


def fields_of(**task: Any) -> tuple[str, ...]:
    with pytest.raises(InvalidTaskError) as refused:
        parse_task({**BASE, **task}, CatalogSettings().task_rules())
    return refused.value.fields


def test_params_are_typed_per_kind_and_kept_in_canonical_form() -> None:
    task = parse_task({**BASE, "params": {"seed": "7", "do_sample": "TRUE", "top_p": "0.5"}})
    assert task.params == {"seed": 7, "do_sample": True, "top_p": 0.5}
    assert task.avro()["params"] == {"seed": "7", "do_sample": "true", "top_p": "0.5"}
    assert parse_task({**BASE, "params": {"seed": MAX_SEED}}).params["seed"] == MAX_SEED
    classify = {**BASE, "kind": "classify", "params": {"labels": "a, b"}}
    assert parse_task(classify).params == {"labels": "a, b"}


@pytest.mark.parametrize(
    ("task", "field"),
    [
        ({"params": {"seed": 10**30}}, "params.seed"),
        ({"params": {"seed": "1e30"}}, "params.seed"),
        ({"params": {"seed": MAX_SEED + 1}}, "params.seed"),
        ({"params": {"temperature": "nan"}}, "params.temperature"),
        ({"params": {"top_p": 0}}, "params.top_p"),
        ({"params": {"max_new_tokens": 4097}}, "params.max_new_tokens"),
        ({"params": {"do_sample": "maybe"}}, "params.do_sample"),
        ({"kind": "classify", "params": {"labels": ",".join(["x"] * 65)}}, "params.labels"),
        ({"kind": "embed", "params": {"max_new_tokens": 4}}, "params.max_new_tokens"),
        ({"labels": [""]}, "labels"),
        ({"template": "nope"}, "template"),
        ({"model": "minilm"}, "model"),  # a model of another kind
        ({"deadline": "1970-01-01T00:00:00Z"}, "deadline"),
        ({"deadline": (datetime.now(UTC) + timedelta(days=400)).isoformat()}, "deadline"),
    ],
)
def test_each_bad_value_is_refused_with_its_field_named(task: dict[str, Any], field: str) -> None:
    assert field in fields_of(**task)


def test_known_templates_and_models_pass_and_a_past_deadline_is_valid() -> None:
    rules = CatalogSettings().task_rules()
    task = {**BASE, "template": "answer", "model": "smollm2", "deadline": "2020-01-01T00:00:00Z"}
    assert parse_task(task, rules).deadline == datetime(2020, 1, 1, tzinfo=UTC)  # ends expired
    assert parse_task({**BASE, "template": "custom"}, TaskRules()).template == "custom"


def test_rules_follow_the_configured_templates_and_models() -> None:
    catalog = CatalogSettings(
        templates={"mine": "{input}"},
        models='[{"name": "g2", "kind": "generate", "source": "/models/g2"}]',
    )
    rules = catalog.task_rules()
    assert rules.templates == frozenset({"mine"})
    assert rules.models == {"generate": frozenset({"g2"})}
    with pytest.raises(InvalidTaskError):
        parse_task({**BASE, "model": "smollm2"}, rules)


def test_preprocess_fails_a_kafka_producers_task_with_the_parameter_named() -> None:
    data = {**BASE, "params": {"do_sample": True, "seed": 1e30}}
    event = Event(
        id="e-1", type="conveyor.task.submitted.v1", source="/x", subject="t-1", data=data
    )
    settings = PreprocessSettings(stage="preprocess")
    ctx = Context(
        "preprocess",
        settings,
        logging.getLogger("t"),
        PreprocessResources(count_tokens=word_count, rules=settings.task_rules()),
    )
    with pytest.raises(InvalidTaskError, match=r"params\.seed"):
        preprocess(event, ctx)


def test_conveyor_submit_builds_params_and_model_from_its_flags() -> None:
    args = build_parser().parse_args(
        ["submit", "--kind", "generate", "--input", "hi", "--model", "smollm2"]
        + ["--param", "max_new_tokens=8", "--param", "seed=3"]
    )
    [task] = _tasks(args)
    assert task["params"] == {"max_new_tokens": "8", "seed": "3"} and task["model"] == "smollm2"
    assert parse_task({**task, "task_id": "c-1"}, CatalogSettings().task_rules()).params == {
        "max_new_tokens": 8,
        "seed": 3,
    }


def test_sqlite_store_creates_its_file_0600_in_a_0700_folder(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a permissive umask: the modes must not depend on it
    try:
        path = tmp_path / "var" / "conveyor.db"
        open_store(f"sqlite:///{path}").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.chmod(0o644)  # an existing, looser file is tightened on open
    open_store(f"sqlite:///{path}").close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_conveyor_submit_refuses_a_bad_parameter_before_sending(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from conveyor.cli.main import main

    # Nothing listens there: the task must be refused before any record is produced.
    monkeypatch.setenv("CONVEYOR_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    argv = ["submit", "--kind", "generate", "--input", "hi", "--param", "seed=1e30"]
    unknown = ["submit", "--kind", "generate", "--input", "hi", "--template", "nope"]
    umask = os.umask(0o022)  # main() tightens the process umask; give the session its own back
    try:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "params.seed" in err and "submitted 0, rejected 1" in err
        assert main(unknown) == 1
        assert "template" in capsys.readouterr().err
        assert os.umask(0o022) == 0o077  # the CLI runs with owner-only new files
    finally:
        os.umask(umask)
