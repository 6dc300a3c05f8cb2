"""Streamed generation's logic without a broker: the gate (chunking and moderation), the
inference-side stream, the chunk record, and the gateway's hub and subscriptions."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conveyor.events.avro import default_schemas
from conveyor.events.codec import DecodeError, encode_binary
from conveyor.events.model import AVRO, Event
from conveyor.events.params import InvalidParamsError, parse_params
from conveyor.ml.moderation import BlocklistSignal
from conveyor.ml.policy import Threshold, assess, default_thresholds
from conveyor.streaming.chunks import (
    COMPLETE,
    INTERRUPTED,
    MODERATION,
    Chunk,
    decode_chunk,
    encode_chunk,
)
from conveyor.streaming.gate import ChunkGate, ChunkRules, Piece, common_prefix, whole_words
from conveyor.streaming.hub import StreamHub
from conveyor.streaming.publisher import ChunkPublisher, moderation_judge
from conveyor.streaming.sinks import wants_stream


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def allow_all(_text: str) -> bool:
    return True


def read(pieces: list[Piece | None], start: str = "") -> str:
    """What a reader holds after applying the pieces by the documented rule."""
    text = start
    for piece in pieces:
        if piece is not None:
            text = text[: piece.offset] + piece.text
    return text


def gate(judge: Any = allow_all, *, min_chars: int = 10, clock: Clock | None = None) -> ChunkGate:
    return ChunkGate(judge, ChunkRules(min_chars, 0.25), clock=clock or Clock())


# --- chunking -------------------------------------------------------------------------------


def test_only_whole_words_are_ready_until_the_final_text() -> None:
    assert whole_words("Rivers carry wat") == "Rivers carry"
    assert whole_words("Rivers carry water ") == "Rivers carry water"
    assert whole_words("Rivers") == ""
    assert whole_words("caf\ufffd") == ""  # a partial UTF-8 character is never shown
    assert whole_words("Le café est\ufffd") == "Le café"


def test_a_piece_waits_for_min_chars_of_new_whole_words() -> None:
    g = gate(min_chars=10)
    assert g.offer("Rivers carry") is None  # "Rivers" only: 6 characters
    first = g.offer("Rivers carry water to")
    assert first == Piece(0, "Rivers carry water")
    assert g.offer("Rivers carry water to the") is None  # " to": 3 new characters
    assert g.offer("Rivers carry water to the sea and") == Piece(18, " to the sea")


def test_a_slow_model_still_shows_progress_after_the_interval() -> None:
    clock = Clock()
    g = gate(min_chars=100, clock=clock)
    assert g.offer("Rivers carry") is None
    clock.now = 0.3
    assert g.offer("Rivers carry") == Piece(0, "Rivers")
    assert g.offer("Rivers carry water") is None  # the interval starts again


def test_the_final_piece_makes_the_readers_text_equal_the_result_and_ends_complete() -> None:
    g = gate(min_chars=1)
    pieces = [g.offer(t) for t in ("The sea", "The sea is  ", "The sea is salty and")]
    final = g.finish("The sea is salty and cold.")
    assert final is not None and final.end == COMPLETE
    assert read([*pieces, final]) == "The sea is salty and cold."
    assert g.offer("The sea is salty and cold. More") is None and g.finish("x") is None


def test_leading_whitespace_is_not_shown_and_a_revision_is_a_piece_at_an_earlier_offset() -> None:
    g = gate(min_chars=1)
    first = g.offer("\n Rivers run fast ")
    assert first == Piece(0, "Rivers run fast")
    revised = g.offer("Rivers ran fast and far ")
    assert revised == Piece(8, "an fast and far")
    assert read([first, revised]) == "Rivers ran fast and far"


def test_common_prefix_counts_code_points() -> None:
    assert common_prefix("naïve cat", "naïve dog") == 6
    assert common_prefix("abc", "abcdef") == 3
    assert common_prefix("", "x") == 0


# --- moderation -----------------------------------------------------------------------------


def test_a_refused_input_ends_the_stream_before_anything_is_shown() -> None:
    g = gate(lambda text: "idiot" not in text)
    assert g.start("you idiot") == Piece(0, "", MODERATION)
    assert g.offer("A perfectly nice answer here ") is None
    assert g.finish("A perfectly nice answer.") is None
    assert g.shown == ""


def test_an_accepted_input_shows_nothing_yet() -> None:
    assert gate().start("a kind question") is None


def test_the_first_refused_text_stops_the_stream_and_nothing_after_it_is_shown() -> None:
    judged: list[str] = []

    def judge(text: str) -> bool:
        judged.append(text)
        return "kill you" not in text

    g = gate(judge, min_chars=1)
    shown = g.offer("I will find ")
    stop = g.offer("I will find and kill you soon ")
    assert shown == Piece(0, "I will find") and stop == Piece(11, "", MODERATION)
    # Judged as the reader would see it: the whole text, not the new piece alone.
    assert judged == ["I will find", "I will find and kill you soon"]
    assert g.offer("I will find and kill you soon, then ") is None
    assert g.finish("I will find and kill you soon, then leave.") is None
    assert read([shown, stop]) == "I will find"


def test_a_phrase_split_across_two_pieces_is_caught_on_the_second() -> None:
    judge = moderation_judge(
        [BlocklistSignal.from_config([{"pattern": "kill you", "reason": "threat"}])],
        default_thresholds(),
    )
    g = gate(judge, min_chars=1)
    assert g.offer("I will kill ") == Piece(0, "I will kill")
    assert g.offer("I will kill you today ") == Piece(11, "", MODERATION)


def test_a_flag_is_enough_to_stop_the_stream_though_the_task_would_be_allowed_through() -> None:
    flag_only = {"blocklist": Threshold(flag=0.5, block=0.9)}
    signal = BlocklistSignal.from_config([{"pattern": "ssn", "reason": "pii", "score": 0.6}])
    assert assess([signal], flag_only, "my ssn is").verdict == "flag"
    g = gate(moderation_judge([signal], flag_only), min_chars=1)
    assert g.offer("my ssn is 1 ") == Piece(0, "", MODERATION)


def test_a_judge_that_raises_stops_the_stream_closed() -> None:
    def broken(_text: str) -> bool:
        raise RuntimeError("model gone")

    g = gate(broken, min_chars=1)
    assert g.offer("Some text here ") == Piece(0, "", MODERATION)


def test_abort_ends_an_unfinished_stream_interrupted_and_only_once() -> None:
    g = gate(min_chars=1)
    g.offer("Half an answer ")
    assert g.abort() == Piece(len("Half an answer"), "", INTERRUPTED)
    assert g.abort() is None
    done = gate()
    done.finish("All of it.")
    assert done.abort() is None


# --- inference side -------------------------------------------------------------------------


class FakeSender:
    def __init__(self, *, fail_after: int | None = None) -> None:
        self.sent: list[Chunk] = []
        self.fail_after = fail_after

    def send(self, chunk: Chunk) -> None:
        from conveyor.errors import BrokerError

        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise BrokerError("producer queue stayed full")
        self.sent.append(chunk)

    def close(self) -> None:
        pass


def test_a_task_stream_numbers_its_chunks_and_ends_complete_on_the_result() -> None:
    sender = FakeSender()
    publisher = ChunkPublisher(sender, allow_all, ChunkRules(1, 0.25), clock=Clock())
    stream = publisher.open("t-1", "acme", "a question")
    for text in ("Rivers", "Rivers run", "Rivers run to the", "Rivers run to the sea"):
        stream.update(text)
    stream.finish("Rivers run to the sea.")
    stream.close()  # after the end: nothing more
    assert [c.seq for c in sender.sent] == list(range(len(sender.sent)))
    assert {(c.task_id, c.tenant, c.run) for c in sender.sent} == {("t-1", "acme", stream.run)}
    assert sender.sent[-1].end == COMPLETE
    text = ""
    for chunk in sender.sent:
        text = text[: chunk.offset] + chunk.text
    assert text == "Rivers run to the sea."


def test_a_stream_that_cannot_publish_ends_without_raising_into_generation() -> None:
    sender = FakeSender(fail_after=1)
    publisher = ChunkPublisher(sender, allow_all, ChunkRules(1, 0.25), clock=Clock())
    stream = publisher.open("t-2", "acme", "q")
    stream.update("One two ")
    stream.update("One two three four ")  # the sender refuses: the stream ends here
    stream.finish("One two three four five.")
    stream.close()
    assert [c.text for c in sender.sent] == ["One two"]
    assert stream.gate.ended == INTERRUPTED


def test_a_run_that_never_finished_is_closed_interrupted() -> None:
    sender = FakeSender()
    stream = ChunkPublisher(sender, allow_all, ChunkRules(1, 0.25)).open("t-3", "acme", "q")
    stream.update("Partial answer ")
    stream.close()
    assert sender.sent[-1].end == INTERRUPTED


def test_each_open_is_a_new_run() -> None:
    publisher = ChunkPublisher(FakeSender(), allow_all, ChunkRules())
    assert publisher.open("t", "a", "q").run != publisher.open("t", "a", "q").run


def test_stream_is_a_validated_generate_parameter() -> None:
    assert parse_params("generate", {"stream": "true"}).stream is True
    assert parse_params("generate", {}).stream is False
    with pytest.raises(InvalidParamsError, match="params.stream"):
        parse_params("generate", {"stream": "maybe"})
    with pytest.raises(InvalidParamsError):
        parse_params("embed", {"stream": "true"})  # only generate streams
    assert wants_stream({"stream": "true", "max_new_tokens": "8"})
    assert not wants_stream({"max_new_tokens": "8"}) and not wants_stream({"stream": "x"})


def test_a_chunk_round_trips_through_its_record() -> None:
    chunk = Chunk("t-1", "acme", "r1", 3, 12, " the sea", None)
    key, headers, value = encode_chunk(chunk, source="/conveyor/inference")
    assert key == b"t-1" and ("ce_type", b"conveyor.task.chunk.v1") in headers
    assert decode_chunk(headers, value) == chunk
    ended = Chunk("t-1", "acme", "r1", 4, 20, "", MODERATION)
    assert decode_chunk(*encode_chunk(ended, source="/x")[1:]) == ended


def test_a_record_that_is_not_a_chunk_is_refused() -> None:
    other = Event(
        id="e",
        type="conveyor.task.other.v1",
        source="/x",
        subject="t",
        data={},
        datacontenttype="application/json",
    )
    headers, value = encode_binary(other, default_schemas())
    with pytest.raises(DecodeError):
        decode_chunk(headers, value)
    with pytest.raises(DecodeError):
        decode_chunk([], b"junk")
    assert AVRO  # chunks are Avro like every internal event


# --- gateway hub ----------------------------------------------------------------------------


def chunk(
    seq: int, offset: int, text: str, *, run: str = "r1", task: str = "t", **kw: Any
) -> Chunk:
    return Chunk(task, kw.pop("tenant", "acme"), run, seq, offset, text, kw.pop("end", None))


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_subscriber_gets_the_difference_since_its_last_message() -> None:
    async def scenario() -> list[list[dict[str, Any]]]:
        hub = StreamHub(max_tasks=10, ttl_s=60)
        sub = hub.subscribe("acme", "t")
        got = [sub.messages()]
        hub.apply([chunk(0, 0, "Rivers run")])
        assert sub.changed.is_set()
        got.append(sub.messages())
        hub.apply([chunk(1, 10, " to the"), chunk(2, 17, " sea", end=COMPLETE)])
        got.append(sub.messages())
        got.append(sub.messages())
        return got

    first, second, third, fourth = run_async(scenario())
    assert first == [] and fourth == []
    assert second == [{"type": "chunk", "task_id": "t", "offset": 0, "text": "Rivers run"}]
    assert third == [
        {"type": "chunk", "task_id": "t", "offset": 10, "text": " to the sea"},
        {"type": "stream_end", "task_id": "t", "reason": COMPLETE},
    ]


def test_a_socket_opened_mid_stream_first_gets_all_the_text_so_far() -> None:
    async def scenario() -> list[dict[str, Any]]:
        hub = StreamHub(max_tasks=10, ttl_s=60)
        hub.apply([chunk(0, 0, "One"), chunk(1, 3, " two"), chunk(2, 7, " three")])
        late = hub.subscribe("acme", "t")
        assert late.changed.is_set()
        return late.messages()

    assert run_async(scenario()) == [
        {"type": "chunk", "task_id": "t", "offset": 0, "text": "One two three"}
    ]


def test_streams_are_per_tenant() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        hub = StreamHub(max_tasks=10, ttl_s=60)
        mine, theirs = hub.subscribe("acme", "t"), hub.subscribe("beta", "t")
        hub.apply([chunk(0, 0, "secret of acme", tenant="acme")])
        assert not theirs.changed.is_set()
        return mine.messages(), theirs.messages()

    mine, theirs = run_async(scenario())
    assert mine[0]["text"] == "secret of acme" and theirs == []


def test_a_new_run_replaces_the_old_ones_text_and_duplicates_are_ignored() -> None:
    async def scenario() -> list[dict[str, Any]]:
        hub = StreamHub(max_tasks=10, ttl_s=60)
        sub = hub.subscribe("acme", "t")
        hub.apply([chunk(0, 0, "First try"), chunk(1, 9, "", end=INTERRUPTED)])
        out = sub.messages()
        hub.apply([chunk(0, 0, "Fresh", run="r2"), chunk(0, 0, "Fresh", run="r2")])
        hub.apply([chunk(2, 0, "ignored: a superseded run", run="r1")])
        return out + sub.messages()

    messages = run_async(scenario())
    assert messages == [
        {"type": "chunk", "task_id": "t", "offset": 0, "text": "First try"},
        {"type": "stream_end", "task_id": "t", "reason": INTERRUPTED},
        # Only what differs: "F" is already in the reader's text.
        {"type": "chunk", "task_id": "t", "offset": 1, "text": "resh"},
    ]
    text = ""
    for m in messages:
        if m["type"] == "chunk":
            text = text[: m["offset"]] + m["text"]
    assert text == "Fresh"


def test_a_missing_chunk_ends_the_stream_interrupted_and_a_run_seen_mid_way_is_not_shown() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        hub = StreamHub(max_tasks=10, ttl_s=60)
        sub = hub.subscribe("acme", "t")
        hub.apply([chunk(0, 0, "Start"), chunk(2, 12, " after a gap")])
        mid = hub.subscribe("acme", "u")
        hub.apply([chunk(5, 30, " tail only", task="u")])
        return sub.messages(), mid.messages()

    gap, mid = run_async(scenario())
    assert gap == [
        {"type": "chunk", "task_id": "t", "offset": 0, "text": "Start"},
        {"type": "stream_end", "task_id": "t", "reason": INTERRUPTED},
    ]
    assert mid == []


def test_the_hub_forgets_the_oldest_streams_beyond_its_bounds() -> None:
    clock = Clock()
    hub = StreamHub(max_tasks=2, ttl_s=10, clock=clock)
    hub.apply([chunk(0, 0, "a", task="t1"), chunk(0, 0, "b", task="t2")])
    hub.apply([chunk(0, 0, "c", task="t3")])
    assert [k[1] for k in hub.streams] == ["t2", "t3"]
    clock.now = 11
    hub.apply([chunk(0, 0, "d", task="t4")])
    assert [k[1] for k in hub.streams] == ["t4"]


def test_an_unsubscribed_socket_is_no_longer_woken() -> None:
    async def scenario() -> StreamHub:
        hub = StreamHub(max_tasks=10, ttl_s=60)
        sub = hub.subscribe("acme", "t")
        sub.close()
        hub.apply([chunk(0, 0, "x")])
        return hub

    assert run_async(scenario()).watchers == {}


# --- inference handler ----------------------------------------------------------------------


class StreamingModel:
    """A generate model that streams word by word to the sinks it is given."""

    def __init__(self, *, fail: bool = False) -> None:
        self.sink_rows: list[list[int]] = []
        self.fail = fail

    def generate(
        self, prompts: list[str], params: list[Any], *, sinks: dict[int, Any] | None = None
    ) -> list[str]:
        self.sink_rows.append(sorted(sinks or {}))
        texts = [f"answer to {p} in several plain words" for p in prompts]
        for row, sink in (sinks or {}).items():
            words = texts[row].split()
            for n in range(1, len(words) + 1):
                sink.update(" ".join(words[:n]))
            if self.fail:
                raise RuntimeError("device lost")
            sink.finish(texts[row])
        return texts


class OneModelRegistry:
    def __init__(self, model: StreamingModel) -> None:
        self.model = model

    def spec(self, kind: str, name: str | None = None) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(kind=kind, name="fake")

    def for_kind(self, kind: str, name: str) -> StreamingModel:
        return self.model


def generate_event(task_id: str, params: dict[str, str]) -> Event:
    data = {
        "task": {
            "task_id": task_id,
            "tenant": "acme",
            "kind": "generate",
            "priority": "normal",
            "callback_url": None,
            "deadline": None,
            "submitted_at": "2026-11-23T00:00:00+00:00",
            "model": None,
            "params": params,
        },
        "input": f"question {task_id}",
        "prompt": f"q{task_id}",
        "token_count": 2,
        "labels": [],
    }
    return Event(
        id=task_id, type="conveyor.task.preprocessed.v1", source="/t", subject=task_id, data=data
    )


def infer_with_streams(model: StreamingModel, events: list[Event], sender: FakeSender) -> list[Any]:
    import logging

    from conveyor.runtime.typed import Context
    from conveyor.services.inference.handler import InferenceResources
    from conveyor.services.inference.settings import InferenceSettings
    from tests.stages import infer

    publisher = ChunkPublisher(sender, allow_all, ChunkRules(1, 0.25))
    context = Context(
        "inference",
        InferenceSettings(stage="inference"),
        logging.getLogger("test"),
        InferenceResources(models=OneModelRegistry(model), streams=publisher),  # type: ignore[arg-type]
    )
    return list(infer(events, context))


def test_only_tasks_that_ask_to_stream_get_a_sink_and_their_chunks_end_on_the_result() -> None:
    model, sender = StreamingModel(), FakeSender()
    events = [
        generate_event("a", {"stream": "true", "max_new_tokens": "8"}),
        generate_event("b", {"max_new_tokens": "8"}),
        generate_event("c", {"stream": "true"}),
    ]
    out = infer_with_streams(model, events, sender)
    assert model.sink_rows == [[0, 2]]  # one batch, the two streaming rows
    for task_id, emitted in zip("abc", out, strict=True):
        assert emitted.data["text"] == f"answer to q{task_id} in several plain words"
    for task_id in "ac":
        chunks = [c for c in sender.sent if c.task_id == task_id]
        text = ""
        for c in chunks:
            text = text[: c.offset] + c.text
        assert text == f"answer to q{task_id} in several plain words"
        assert chunks[-1].end == COMPLETE and len(chunks) > 2
    assert not [c for c in sender.sent if c.task_id == "b"]


def test_a_generation_that_fails_ends_its_streams_interrupted() -> None:
    model, sender = StreamingModel(fail=True), FakeSender()
    out = infer_with_streams(model, [generate_event("a", {"stream": "true"})], sender)
    assert isinstance(out[0], RuntimeError)
    assert sender.sent and sender.sent[-1].end == INTERRUPTED


def test_without_a_publisher_nobody_streams_and_the_model_gets_no_sinks() -> None:
    import logging

    from conveyor.runtime.typed import Context
    from conveyor.services.inference.handler import InferenceResources
    from conveyor.services.inference.settings import InferenceSettings
    from tests.stages import infer

    model = StreamingModel()
    context = Context(
        "inference",
        InferenceSettings(stage="inference"),
        logging.getLogger("test"),
        InferenceResources(models=OneModelRegistry(model)),  # type: ignore[arg-type]
    )
    out = infer([generate_event("a", {"stream": "true"})], context)
    assert model.sink_rows == [[]] and out[0].data["text"]  # type: ignore[union-attr]
