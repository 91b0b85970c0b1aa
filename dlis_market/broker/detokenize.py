"""Streaming detokenization: each new token's text from a short window, not the whole answer.

Decoding the whole answer on every token costs O(n) per token, O(n^2) per job. A byte-level BPE
token may end inside a multi-byte UTF-8 character (it decodes to U+FFFD until the rest arrives),
and some tokenizers change a token's text by what precedes it (a leading space), so a token is
decoded together with the tokens since the last emitted piece and the few before them (the same
scheme as Hugging Face's TextStreamer and vLLM's incremental detokenizer). The pieces joined equal
the whole answer decoded once.

:class:`StopMatcher` cuts that text at OpenAI-style stop strings without ever emitting a part of one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Tokens of context kept before the pending ones (enough for any leading-space rule).
CONTEXT_TOKENS = 4


class StreamDecoder:
    """Feed token ids one at a time; get the text each one completes."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # window start: context tokens already emitted
        self._read = 0  # tokens up to here are emitted

    def push(self, token: int) -> str:
        """The new text ``token`` completes ('' while it ends inside a character)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""  # an incomplete character, or nothing visible yet: wait for more
        self._read = len(self.ids)
        self._prefix = max(self._read - CONTEXT_TOKENS, 0)
        return now[len(before) :]

    def flush(self) -> str:
        """What the tokens since the last piece decode to (at the end, even if incomplete)."""
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        self._read = len(self.ids)
        self._prefix = max(self._read - CONTEXT_TOKENS, 0)
        return now[len(before) :]


class StopMatcher:
    """Cuts streamed text at the first of its stop strings (OpenAI's ``stop``).

    Text that may be the start of a stop string is held back until the next piece shows whether
    it is, so no part of a stop string is ever emitted, even one spread over several tokens.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._pending = ""  # text seen but not emitted yet

    def push(self, piece: str) -> str:
        """The text that is safe to emit after ``piece`` ('' once a stop string was seen)."""
        if self.stopped:
            return ""
        self._pending += piece
        if not self.stops:
            out, self._pending = self._pending, ""
            return out
        cut = min((i for s in self.stops if (i := self._pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self._pending = self._pending[:cut], ""
            return out
        keep = self._held()
        out, self._pending = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep :]
        return out

    def cut(self, text: str) -> tuple[str, bool]:
        """A whole text cut at the first stop string, and whether one was found."""
        out = self.push(text) + self.flush()
        return out, self.stopped

    def flush(self) -> str:
        """At the end of the answer: what was held back (nothing once stopped)."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _held(self) -> int:
        """Length of the longest end of the pending text that begins some stop string."""
        for n in range(min(len(self._pending), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = self._pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
