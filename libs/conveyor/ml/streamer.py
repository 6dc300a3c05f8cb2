"""Partial text of the rows of one batched `generate` call, as the tokens are produced.

transformers calls a streamer's `put` with the prompt ids (batch x length) first, then with
the new token of every row (batch) after each decoding step. Its own `TextStreamer` and
`TextIteratorStreamer` refuse batches; `RowStreamer` keeps one token list per row that has a
sink, so streaming tasks share batches with the rest: a batch runs as it would without them.
Each sink receives the row's whole partial text after every token (cut at the row's own
budget, as the result is) and, from `Generator`, the final text once the call returns, the very
text the task's result carries. A sink that raises is dropped for the rest of the call: it
never fails generation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from transformers.generation.streamers import BaseStreamer

log = logging.getLogger(__name__)


class TextSink(Protocol):
    """Where one row's partial text goes (`conveyor.streaming.publisher.TaskStream`)."""

    def update(self, text: str) -> None:
        """The row's whole partial text so far."""

    def finish(self, text: str) -> None:
        """The row's final text: exactly the task's result."""

    def close(self) -> None:
        """No more text is coming (a final text may or may not have been given)."""


class RowStreamer(BaseStreamer):
    """A streamer for rows `sinks` (row index -> sink) of a batch, each cut at `budgets[row]`."""

    def __init__(self, tokenizer: Any, sinks: dict[int, TextSink], budgets: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.sinks = dict(sinks)
        self.budgets = budgets
        self.tokens: dict[int, list[int]] = {row: [] for row in sinks}
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first call carries the prompts
            self._prompt_seen = True
            return
        step = value.reshape(-1).tolist()
        for row in list(self.sinks):
            tokens = self.tokens[row]
            if len(tokens) >= self.budgets[row]:
                continue
            tokens.append(step[row])
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            self._call(row, "update", text)

    def end(self) -> None:
        """Nothing to do: the caller gives each sink its final text (`finish_rows`)."""

    def finish_rows(self, texts: Sequence[str]) -> None:
        """Give every sink its row's final text (`texts` in row order) and close it."""
        for row in list(self.sinks):
            self._call(row, "finish", texts[row])
        self.close()

    def close(self) -> None:
        for sink in self.sinks.values():
            try:
                sink.close()
            except Exception as exc:
                log.warning("stream sink failed on close error=%r", exc)
        self.sinks.clear()

    def _call(self, row: int, method: str, text: str) -> None:
        try:
            getattr(self.sinks[row], method)(text)
        except Exception as exc:  # a sink never fails generation
            log.warning("stream sink failed; row no longer streamed row=%d error=%r", row, exc)
            del self.sinks[row]
