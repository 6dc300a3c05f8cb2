"""The stream gate: which partial text of one task may be published, and when.

Inference hands the gate a row's whole partial text after every generated token; the gate
answers with the piece to publish, if any. It decides two things.

- **Chunking.** A piece goes out once at least `min_chars` new characters are ready, or once
  `max_interval_s` has passed since the last piece and something new is ready. Until the final
  text, only whole words are ready (the text up to its last whitespace, without a trailing
  partial UTF-8 character): a word is never shown half-made, nor judged half-made (a blocklist
  phrase cut in the middle of a word would pass).
- **Moderation.** The task's input is judged once, before anything is shown; then each piece is
  judged with everything shown before it (the text as the reader will see it, so a phrase split
  across two chunks is caught). Only text the policy allows outright (no signal at its *flag*
  threshold) is shown. The first text that fails ends the stream for good with reason
  `moderation`: nothing after it is shown, while the task itself goes on, and its final result
  is moderated and delivered as it always is. A judge that raises counts as a refusal.

Pieces follow the reader's rule `text = text[:offset] + piece.text`, so a revision of text
already shown (a tokenizer that re-reads a byte sequence differently, the final text stripped)
is a piece at an earlier offset. `tests/unit/test_stream_gate.py` proves each rule.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from conveyor.streaming.chunks import COMPLETE, INTERRUPTED, MODERATION

log = logging.getLogger(__name__)

Judge = Callable[[str], bool]  # True: the text may be shown
# The last run of whitespace before a (possibly empty) trailing partial word.
_LAST_BREAK = re.compile(r"\s+\S*$")
_PARTIAL_CHAR = "\ufffd"  # what a decoder shows for a UTF-8 sequence not yet complete


# 16 characters is about four tokens: a piece every ~0.1 s at CPU decoding speed, and a
# moderation pass per piece rather than per token.
MIN_CHARS = 16
# A slow model still shows progress four times a second.
MAX_INTERVAL_S = 0.25


@dataclass(frozen=True, slots=True)
class ChunkRules:
    min_chars: int = MIN_CHARS
    max_interval_s: float = MAX_INTERVAL_S


@dataclass(frozen=True, slots=True)
class Piece:
    """What to publish: `text` at `offset` of the shown text; `end` on the stream's last."""

    offset: int
    text: str
    end: str | None = None


class ChunkGate:
    """The gate of one generation run of one task (not thread-safe: one row, one thread)."""

    def __init__(
        self, judge: Judge, rules: ChunkRules, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.judge = judge
        self.rules = rules
        self.clock = clock
        self.shown = ""  # everything published so far, as a reader has it
        self.ended: str | None = None
        self._last = clock()

    def start(self, input_text: str) -> Piece | None:
        """Judge the task's input before anything is shown: a refused input ends the stream."""
        if self._allowed(input_text):
            return None
        return self._end(MODERATION)

    def offer(self, text: str) -> Piece | None:
        """The piece to publish now that the partial text is `text`, if one is due."""
        if self.ended is not None:
            return None
        ready = whole_words(text.lstrip())
        offset = common_prefix(self.shown, ready)
        fresh = len(ready) - offset
        if fresh <= 0:
            return None
        waited = self.clock() - self._last
        if fresh < self.rules.min_chars and waited < self.rules.max_interval_s:
            return None
        return self._publish(ready, end=None)

    def finish(self, text: str) -> Piece | None:
        """The last piece: the final text, all of it (it ends the stream `complete`)."""
        if self.ended is not None:
            return None
        return self._publish(text, end=COMPLETE)

    def abort(self) -> Piece | None:
        """End a stream the run could not finish (its generation failed): `interrupted`."""
        return None if self.ended is not None else self._end(INTERRUPTED)

    def _publish(self, text: str, *, end: str | None) -> Piece:
        if text != self.shown and not self._allowed(text):
            return self._end(MODERATION)
        offset = common_prefix(self.shown, text)
        piece = Piece(offset, text[offset:], end)
        self.shown = text
        self._last = self.clock()
        self.ended = end
        return piece

    def _end(self, reason: str) -> Piece:
        self.ended = reason
        return Piece(len(self.shown), "", reason)

    def _allowed(self, text: str) -> bool:
        try:
            return self.judge(text)
        except Exception as exc:  # fail closed: text nobody could judge is not shown
            log.warning("stream moderation failed; stream stopped error=%r", exc)
            return False


def whole_words(text: str) -> str:
    """`text` up to its last whitespace (no trailing partial word or partial character)."""
    text = text.rstrip(_PARTIAL_CHAR)
    match = _LAST_BREAK.search(text)
    return text[: match.start()] if match else ""


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of `a` and `b`."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the common case, in C: text only grows
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
