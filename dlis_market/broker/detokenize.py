"""Streaming detokenization: each new token's text from a short window, not the whole answer.

Decoding the whole answer on every token costs O(n) per token, O(n^2) per job. A byte-level BPE
token may end inside a multi-byte UTF-8 character (it decodes to U+FFFD until the rest arrives),
and some tokenizers change a token's text by what precedes it (a leading space), so a token is
decoded together with the tokens since the last emitted piece and the few before them (the same
scheme as Hugging Face's TextStreamer and vLLM's incremental detokenizer). The pieces joined equal
the whole answer decoded once.
"""

from __future__ import annotations

from collections.abc import Callable

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
