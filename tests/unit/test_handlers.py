"""Each stage's decisions, with fakes for models, HTTP and time: no broker, no real model."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from conveyor.errors import PermanentError, RetryableError
from conveyor.events.model import Event
from conveyor.runtime import Emit
from conveyor.runtime.typed import Context, Record
from conveyor.services.inference.handler import InferenceResources
from conveyor.services.inference.settings import InferenceSettings
from conveyor.services.moderation.handler import ModerationResources, decide
from conveyor.services.moderation.settings import ModerationSettings, Threshold
from conveyor.services.notify.handler import NotifyResources
from conveyor.services.notify.settings import NotifySettings
from conveyor.services.preprocess.handler import (
    PreprocessResources,
    normalise,
    with_task_id,
    word_count,
)
from conveyor.services.preprocess.settings import PreprocessSettings
from conveyor.services.writeback.__main__ import WRITEBACK
from conveyor.services.writeback.handler import WritebackResources
from conveyor.services.writeback.handler import update_for as update_for_record
from conveyor.services.writeback.settings import WritebackSettings
from conveyor.store import open_store
from conveyor.webhooks import new_secret, verify
from conveyor.webhooks.sender import WebhookRequest
from tests.eventdata import inferred_data
from tests.stages import infer, moderate, preprocess, write_back
from tests.stages import notify as notify_batch

LOG = logging.getLogger("test")


def ctx(settings: Any, resources: Any) -> Context[Any, Any]:
    return Context("test", settings, LOG, resources)


# Each stage through its typed seam (tests/stages.py): the payload read, then the handler.


def update_for(e: Event) -> Any:
    record = WRITEBACK.read(e)
    assert isinstance(record, Record)
    return update_for_record(record)


def event(type_: str, data: Any, subject: str = "t-1", **ext: str) -> Event:
    return Event(
        id=f"id-{subject}-{type_}",
        type=type_,
        source="/test",
        subject=subject,
        data=data,
        time="2026-11-23T00:00:00+00:00",
        extensions=ext,
    )


def task(task_id: str = "t-1", **over: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "tenant": "acme",
        "kind": "embed",
        "priority": "normal",
        "callback_url": "http://127.0.0.1:9/hook",
        "deadline": None,
        "submitted_at": "2026-11-23T00:00:00+00:00",
        "model": None,
        "params": {},
        **over,
    }


# -- preprocess ---------------------------------------------------------------------------------

PRE = PreprocessSettings(stage="preprocess")


def submitted(**data: Any) -> Event:
    body = {"task_id": "t-1", "tenant": "acme", "kind": "generate", "input": "hi", **data}
    return event("conveyor.task.submitted.v1", body)


def test_preprocess_normalises_templates_counts_and_routes_by_priority() -> None:
    out = preprocess(
        submitted(
            input="  Ｈｅｌｌｏ\u00a0\u00a0world \r\n\n\n\nbye ", template="answer", priority="high"
        ),
        ctx(PRE, PreprocessResources(count_tokens=word_count)),
    )
    assert isinstance(out, Emit)
    assert out.topic == "conveyor.task.preprocessed.high"
    assert out.data["input"] == "Hello world\n\nbye"
    assert out.data["prompt"].endswith("Question: Hello world\n\nbye")
    assert out.data["token_count"] == len(out.data["prompt"].split())
    assert out.extensions["priority"] == "high"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"input": " \n\t "}, "empty"),
        ({"template": "nope"}, "unknown template"),
        ({"kind": "dance"}, "kind"),
        ({"input": "word " * 600}, "tokens"),
        ({"callback_url": "ftp://x"}, "callback_url"),
    ],
)
def test_preprocess_rejects_bad_tasks_permanently(data: dict[str, Any], reason: str) -> None:
    with pytest.raises(PermanentError, match=reason):
        preprocess(submitted(**data), ctx(PRE, PreprocessResources(count_tokens=word_count)))


def test_preprocess_gives_a_task_without_id_a_deterministic_one_and_says_so() -> None:
    body = {"tenant": "acme", "kind": "embed", "input": "hi"}
    keyless = Event(
        id="e-1", type="conveyor.task.submitted.v1", source="/up", subject=None, data=body
    )
    out = preprocess(keyless, ctx(PRE, PreprocessResources(count_tokens=word_count)))
    assert isinstance(out, Emit)
    task_id = out.data["task"]["task_id"]
    assert task_id.startswith("auto-") and out.extensions["assignedid"] == "event /up e-1"
    again = preprocess(
        keyless, ctx(PRE, PreprocessResources(count_tokens=word_count))
    )  # a redelivery
    assert isinstance(again, Emit) and again.data["task"]["task_id"] == task_id
    other = with_task_id(Event(id="e-2", type="x", source="/up", subject=None, data=body))[0]
    assert other["task_id"] != task_id
    named = with_task_id(Event(id="e-3", type="x", source="/up", subject="sub-1", data=body))
    assert named == ({**body, "task_id": "sub-1"}, "subject sub-1")
    assert with_task_id(submitted()) == (submitted().data, None)  # it has one: unchanged


def test_normalise_is_nfkc_and_collapses_whitespace() -> None:
    assert normalise("ﬁne\t\tcafe\u0301  ") == "fine café"


# -- inference ----------------------------------------------------------------------------------


@dataclass
class FakeSpec:
    kind: str
    name: str


class FakeModel:
    def __init__(self, calls: list[tuple[str, int]], kind: str) -> None:
        self.calls, self.kind = calls, kind

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.calls.append(("embed", len(texts)))
        return [[float(len(t))] for t in texts]

    def generate(self, prompts: list[str], params: list[Any]) -> list[str]:
        self.calls.append(("generate", len(prompts)))
        return [p.upper() for p in prompts]


class FakeRegistry:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def spec(self, kind: str, name: str | None = None) -> FakeSpec:
        if name not in (None, "tiny"):
            raise KeyError(f"no model {name!r} of kind {kind!r} is configured")
        return FakeSpec(kind, "tiny")

    def for_kind(self, kind: str, name: str) -> FakeModel:
        return FakeModel(self.calls, kind)


def preprocessed(task_id: str, **over: Any) -> Event:
    data = {
        "task": task(task_id, **over),
        "input": f"in-{task_id}",
        "prompt": f"p-{task_id}",
        "token_count": 1,
        "labels": [],
    }
    return event("conveyor.task.preprocessed.v1", data, subject=task_id)


def test_inference_runs_one_call_per_kind_and_returns_one_outcome_per_record() -> None:
    registry = FakeRegistry()
    events = [
        preprocessed("a"),
        preprocessed("b", kind="generate"),
        preprocessed("c"),
        preprocessed("d", deadline="2020-01-01T00:00:00+00:00"),
        preprocessed("e", model="huge"),
        preprocessed("f", kind="generate", params={"temperature": "-1"}),
    ]
    out = infer(
        events, ctx(InferenceSettings(stage="inference"), InferenceResources(models=registry))
    )
    assert sorted(registry.calls) == [("embed", 2), ("generate", 1)]
    assert out[0].data["embedding"] == [4.0] and out[2].data["embedding"] == [4.0]
    assert out[1].data["text"] == "P-B"
    assert out[3].data["status"] == "expired" and out[3].topic == "conveyor.task.status"
    assert isinstance(out[4], PermanentError) and "huge" in str(out[4])
    assert isinstance(out[5], PermanentError)


# -- moderation ---------------------------------------------------------------------------------


@dataclass
class Result:
    signal: str
    score: float
    reason: str


class FakeSignal:
    name = "profanity"

    def evaluate(self, texts: list[str]) -> list[Result]:
        return [Result(self.name, 0.95 if "damn" in t else 0.1, "fake") for t in texts]


def inferred(task_id: str, text: str | None, input_text: str = "fine") -> Event:
    data = inferred_data(task_id, text=text) | {"task": task(task_id), "input": input_text}
    return event("conveyor.task.inferred.v1", data, subject=task_id)


def test_moderation_checks_input_and_output_and_withholds_blocked_output() -> None:
    settings = ModerationSettings(stage="moderation")
    out = moderate(
        [
            inferred("a", "all good"),
            inferred("b", "damn it"),
            inferred("c", "ok", input_text="damn you"),
        ],
        ctx(settings, ModerationResources(signals=[FakeSignal()])),
    )
    assert [o.data["verdict"] for o in out] == ["allow", "block", "block"]
    assert out[0].data["text"] == "all good"
    assert out[1].data["text"] is None and out[2].data["text"] is None
    assert out[1].data["reasons"] == ["profanity: fake"]


def test_moderation_thresholds_make_allow_flag_block() -> None:
    limits = {"profanity": Threshold(flag=0.5, block=0.8)}
    assert decide({"profanity": (0.2, "r")}, limits).verdict == "allow"
    assert decide({"profanity": (0.6, "r")}, limits).verdict == "flag"
    assert decide({"profanity": (0.8, "r")}, limits).verdict == "block"
    assert decide({"other": (1.0, "r")}, limits).verdict == "allow"  # no threshold: reports only


# -- writeback ----------------------------------------------------------------------------------


def moderated(task_id: str, verdict: str) -> Event:
    data = {
        "task": task(task_id),
        "model": "tiny",
        "text": None if verdict == "block" else "x",
        "embedding": None,
        "label": None,
        "label_scores": {},
        "verdict": verdict,
        "scores": {"profanity": 0.1},
        "reasons": [],
    }
    return event(
        "conveyor.task.moderated.v1",
        data,
        subject=task_id,
        traceparent="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01",
    )


def status(task_id: str, value: str, stage: str, **extra: Any) -> Event:
    data = {
        "task_id": task_id,
        "tenant": "acme",
        "status": value,
        "stage": stage,
        "reason": "boom",
        "error_class": "X",
        "attempt": 1,
        "callback_url": None,
        "kind": "embed",
        "time": "2026-11-23T00:00:01+00:00",
        **extra,
    }
    return event("conveyor.task.status.v1", data, subject=task_id)


@pytest.mark.parametrize(
    ("traceparent", "trace_id"),
    [
        ("00-" + "ab" * 16 + "-" + "cd" * 8 + "-01", "ab" * 16),
        ("00-" + "AB" * 16 + "-" + "cd" * 8 + "-01", None),  # upper case: not W3C
        ("00-" + "0" * 32 + "-" + "cd" * 8 + "-01", None),  # the invalid all-zero trace id
        ("00-abc-def-01", None),
    ],
)
def test_writeback_stores_the_trace_id_only_of_a_valid_traceparent(
    traceparent: str, trace_id: str | None
) -> None:
    update = update_for(later(moderated("a", "allow"), 1, traceparent=traceparent))
    assert update is not None and update.trace_id == trace_id


def test_writeback_stage_is_the_producer_and_error_comes_only_with_an_ending_status() -> None:
    processing = update_for(preprocessed("a"))
    assert processing is not None and (processing.status, processing.stage) == (
        "processing",
        "preprocess",
    )
    done = update_for(moderated("a", "allow"))
    assert done is not None and (done.status, done.stage) == ("completed", "moderation")
    expired, retrying = (
        update_for(status("b", "expired", "inference")),
        update_for(status("c", "retrying", "inference")),
    )
    assert expired is not None and expired.error == "boom"
    assert retrying is not None and retrying.error is None


def later(e: Event, seconds: int, **ext: str) -> Event:
    """`e` emitted `seconds` later, under another id, with extra extensions."""
    return Event(
        id=f"{e.id}+{seconds}",
        type=e.type,
        source=e.source,
        subject=e.subject,
        data=e.data,
        time=f"2026-11-23T00:00:{seconds:02d}+00:00",
        extensions={**e.extensions, **ext},
    )


def test_writeback_stores_results_once_and_emits_stored_for_terminal_tasks() -> None:
    store = open_store("sqlite:///:memory:")
    events = [
        preprocessed("a"),
        moderated("a", "allow"),
        moderated("b", "block"),
        status("c", "failed", "inference"),
        status("d", "retrying", "inference"),
        status("a", "failed", "notify"),
    ]
    settings = WritebackSettings(stage="writeback")
    out = write_back(events, ctx(settings, WritebackResources(store=store)))
    assert [o.data["status"] if isinstance(o, Emit) else None for o in out] == [
        None,
        "completed",
        "blocked",
        "failed",
        None,
        None,
    ]
    write_back(events, ctx(settings, WritebackResources(store=store)))  # redelivery changes nothing
    a, b, c = store.get("a"), store.get("b"), store.get("c")
    assert a is not None and a.status == "completed" and a.trace_id == "ab" * 16
    assert b is not None and b.result is None and b.verdict == "block"
    assert c is not None and c.status == "failed" and c.error == "boom"
    assert len(store.timeline("a")) == 2  # the notify failure is not in the task's row
    assert update_for(status("a", "failed", "notify")) is None


def test_writeback_notes_a_rejected_record_on_an_existing_task_and_changes_nothing() -> None:
    store = open_store("sqlite:///:memory:")
    settings = WritebackSettings(stage="writeback")
    write_back([moderated("a", "allow")], ctx(settings, WritebackResources(store=store)))
    reason = "DecodeError: structured CloudEvent is not JSON"
    rejected = later(status("a", "failed", "preprocess", reason=reason, rejected_record=True), 9)
    fresh = status("z", "failed", "preprocess", reason=reason, rejected_record=True)
    out = write_back([rejected, fresh], ctx(settings, WritebackResources(store=store)))
    assert out[0] is None  # nothing to notify: the task did not change
    assert isinstance(out[1], Emit) and out[1].data["status"] == "failed"
    a, z = store.get("a"), store.get("z")
    assert a is not None and (a.status, a.result, a.error) == (
        "completed",
        {"model": "tiny", "text": "x"},
        None,
    )
    assert z is not None and (z.status, z.error) == ("failed", reason)
    note = store.timeline("a")[-1]
    assert note.status == "rejected-record" and reason in (note.detail or "")


def test_writeback_a_late_failure_never_replaces_an_outcome_and_notifies_nobody() -> None:
    store = open_store("sqlite:///:memory:")
    settings = WritebackSettings(stage="writeback")
    write_back([moderated("a", "allow")], ctx(settings, WritebackResources(store=store)))
    out = write_back(
        [later(status("a", "failed", "inference"), 30)],
        ctx(settings, WritebackResources(store=store)),
    )
    assert out == [None]
    a = store.get("a")
    assert a is not None and a.status == "completed" and a.error is None


def test_writeback_lets_an_operator_rerun_replace_a_failure_and_the_timeline_says_so() -> None:
    store = open_store("sqlite:///:memory:")
    settings = WritebackSettings(stage="writeback")
    write_back([status("a", "failed", "inference")], ctx(settings, WritebackResources(store=store)))
    retry = later(moderated("a", "allow"), 20)  # no operator action: the failure stands
    assert write_back([retry], ctx(settings, WritebackResources(store=store))) == [None]
    rerun = "redrive p.conveyor.inference.dlq:0:4"
    out = write_back(
        [
            later(preprocessed("a"), 30, rerun=rerun),
            later(moderated("a", "allow"), 40, rerun=rerun),
        ],
        ctx(settings, WritebackResources(store=store)),
    )
    assert out[0] is None and isinstance(out[1], Emit) and out[1].data["status"] == "completed"
    a = store.get("a")
    assert a is not None and a.status == "completed"
    details = [e.detail or "" for e in store.timeline("a")]
    assert details[-2] == f"operator {rerun}" and details[-1] == f"operator {rerun}: verdict allow"


# -- notify -------------------------------------------------------------------------------------


def stored(task_id: str, url: str | None = "http://hooks.test/h") -> Event:
    data = {
        "task": task(task_id, callback_url=url),
        "status": "completed",
        "verdict": "allow",
        "result": json.dumps({"text": "hi"}),
        "error": None,
    }
    return event("conveyor.task.stored.v1", data, subject=task_id)


SECRET = new_secret()


@dataclass
class FakeSender:
    """Answers every webhook with `answer` (a status or an error) and keeps the requests."""

    answer: int | Exception
    seen: list[WebhookRequest]

    def deliver(
        self,
        requests: Sequence[WebhookRequest],
        on_result: Callable[[int, int | Exception], None],
    ) -> list[int | Exception]:
        self.seen.extend(requests)
        for index in reversed(range(len(requests))):  # answers come in any order
            on_result(index, self.answer)
        return [self.answer for _ in requests]


def notify_ctx(
    answer: int | Exception, seen: list[WebhookRequest], **over: Any
) -> Context[Any, Any]:
    settings = NotifySettings(stage="notify", **{"webhook_secrets": {"acme": SECRET}, **over})
    sender = FakeSender(answer, seen)
    return ctx(settings, NotifyResources(store=open_store("sqlite:///:memory:"), webhooks=sender))


def notify(event: Event, c: Context[Any, Any]) -> Any:
    """One record through the batch handler; its failure raised as the runtime would see it."""
    (outcome,) = notify_batch([event], c)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def test_notify_signs_the_body_and_notifies_a_task_once() -> None:
    seen: list[WebhookRequest] = []
    c = notify_ctx(200, seen)
    out = notify(stored("a"), c)
    assert isinstance(out, Emit) and out.data["http_status"] == 200
    summary = verify(seen[0].body, seen[0].headers, SECRET)
    assert summary["result"] == {"text": "hi"}
    assert seen[0].headers["webhook-id"] == stored("a").id  # stable across attempts
    assert notify(stored("a"), c) is None and len(seen) == 1  # never twice


def test_notify_retries_5xx_and_dead_letters_4xx_releasing_the_claim() -> None:
    seen: list[WebhookRequest] = []
    c = notify_ctx(503, seen)
    with pytest.raises(RetryableError):
        notify(stored("a"), c)
    with pytest.raises(RetryableError):
        notify(stored("a"), c)  # the claim was released: the retry sends again
    assert len(seen) == 2
    with pytest.raises(PermanentError):
        notify(stored("b"), notify_ctx(404, seen))


def test_notify_sends_each_tenants_webhook_for_an_equal_task_id() -> None:
    # A task is (tenant, task id): beta's task "a" is not acme's, and both are notified once.
    seen: list[WebhookRequest] = []
    beta_secret = new_secret()
    c = notify_ctx(200, seen, webhook_secrets={"acme": SECRET, "beta": beta_secret})
    acme = stored("a")
    beta_data = {**acme.data, "task": {**acme.data["task"], "tenant": "beta"}}
    beta = dataclasses.replace(acme, id="id-b", data=beta_data)
    assert isinstance(notify(acme, c), Emit) and isinstance(notify(beta, c), Emit)
    assert notify(acme, c) is None and notify(beta, c) is None and len(seen) == 2
    assert verify(seen[1].body, seen[1].headers, beta_secret)["tenant"] == "beta"
    store = c.resources.store
    assert {n.tenant for n in store.list_notifications()} == {"acme", "beta"}


def test_notify_retries_a_claim_left_by_a_dead_sender_and_takes_it_over_after_the_lease() -> None:
    seen: list[WebhookRequest] = []
    c = notify_ctx(200, seen, claim_lease_s=0.2)
    store = c.resources.store
    assert store.claim_notification("a", "ev-a", "http://hooks.test/h", tenant="acme")  # then died
    with pytest.raises(RetryableError, match="has not finished"):
        notify(stored("a"), c)
    assert seen == []
    time.sleep(0.25)
    out = notify(stored("a"), c)
    assert isinstance(out, Emit) and out.data["http_status"] == 200 and len(seen) == 1
    assert store.notification("a", tenant="acme").status == "delivered"
    assert notify(stored("a"), c) is None and len(seen) == 1  # delivered: skipped, not retried


def test_notify_without_callback_url_emits_notified_with_no_channel() -> None:
    out = notify(stored("a", url=None), notify_ctx(200, []))
    assert isinstance(out, Emit) and out.data["channel"] == "none"


def test_notify_refuses_a_tenant_without_its_own_secret_before_claiming() -> None:
    seen: list[WebhookRequest] = []
    c = notify_ctx(200, seen)
    other = stored("a")
    other.data["task"]["tenant"] = "globex"  # no secret configured for globex
    with pytest.raises(PermanentError, match="no webhook secret configured for tenant 'globex'"):
        notify(other, c)
    assert seen == [] and c.resources.store.notification("a") is None


def test_notify_dead_letters_a_redirect_and_a_refused_destination_releasing_the_claim() -> None:
    from conveyor.webhooks.policy import DestinationRefusedError

    seen: list[WebhookRequest] = []
    c = notify_ctx(302, seen)
    with pytest.raises(PermanentError, match="302: redirects are not followed"):
        notify(stored("a"), c)
    assert c.resources.store.notification("a") is None
    refused = notify_ctx(DestinationRefusedError("127.0.0.1 is loopback"), seen)
    with pytest.raises(DestinationRefusedError, match="loopback"):
        notify(stored("b"), refused)
    assert refused.resources.store.notification("b") is None


def test_notify_signs_with_every_secret_of_a_tenant_during_rotation() -> None:
    seen: list[WebhookRequest] = []
    old, new = new_secret(), new_secret()
    c = notify_ctx(200, seen, webhook_secrets={"acme": [new, old]})
    notify(stored("a"), c)
    assert len(seen[0].headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):  # a receiver holding either secret accepts it
        verify(seen[0].body, seen[0].headers, secret)


def test_notify_hands_the_task_trace_context_to_the_webhook_without_a_span() -> None:
    from tests.eventdata import TRACEPARENT

    seen: list[WebhookRequest] = []
    traced = event("conveyor.task.stored.v1", stored("a").data, "a", traceparent=TRACEPARENT)
    notify(traced, notify_ctx(200, seen))
    assert seen[0].traceparent == TRACEPARENT
    parent = seen[0].parent
    assert parent is not None and parent.get_span_context().trace_id == int("ab" * 16, 16)


def test_notify_settles_each_webhook_of_a_batch_on_its_own() -> None:
    seen: list[WebhookRequest] = []
    c = notify_ctx(200, seen)
    outcomes = notify_batch([stored("a"), stored("b", url=None), stored("a")], c)
    assert isinstance(outcomes[0], Emit) and outcomes[0].data["http_status"] == 200
    assert isinstance(outcomes[1], Emit) and outcomes[1].data["channel"] == "none"
    assert isinstance(outcomes[2], RetryableError)  # same task, claimed by the first: later
    assert len(seen) == 1


class FlakyStore:
    """The real store, except that recording the answer of `task_id` fails transiently."""

    def __init__(self, task_id: str) -> None:
        self.inner = open_store("sqlite:///:memory:")
        self.task_id = task_id

    def complete_notification(self, task_id: str, http_status: int, **kw: Any) -> bool:
        if task_id == self.task_id:
            raise RetryableError("sqlite: database is locked")
        return self.inner.complete_notification(task_id, http_status, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_notify_a_store_fault_recording_one_answer_fails_that_record_alone() -> None:
    # Raising out of the batch would re-run it record by record, and every webhook still
    # claimed would then wait out its lease and be sent a second time.
    seen: list[WebhookRequest] = []
    c = notify_ctx(200, seen)
    store = FlakyStore("b")
    c = dataclasses.replace(c, resources=dataclasses.replace(c.resources, store=store))
    outcomes = notify_batch([stored("a"), stored("b"), stored("c")], c)
    assert isinstance(outcomes[1], RetryableError) and "locked" in str(outcomes[1])
    assert all(isinstance(outcomes[i], Emit) for i in (0, 2))
    assert len(seen) == 3
    assert store.notification("a", tenant="acme").status == "delivered"
    assert store.notification("c", tenant="acme").status == "delivered"
