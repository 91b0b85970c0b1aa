"""What a stage received, per session, kept for a while after the session closes: spot checks.

A spot check re-executes one stage call on another worker with the *same inputs* and compares
the outputs (``dlis_market.protocol.outputs``). Activations travel stage to stage, so the
session's opener (the driver) never sees them; instead every stage keeps the input rows it ran
for each session (token ids at the first stage, hidden states after it) and, once the session is
closed, retains them for ``node.transcript_retain_s`` within ``node.transcript_retain_bytes``
(oldest dropped first). Only the peer that opened the session may read its transcript: inputs
are the client's prompt and its activations.

The rows are bound to signed receipts: a stage's receipt signs ``sha256`` of its concatenated
output rows, which are exactly the next stage's input rows, so a runner checks a transcript
against the previous stage's receipt before it trusts it (:func:`Transcript.sha256`).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dlis_market.inference.errors import MessageError
from dlis_market.inference.messages import StageInput, dtype_name, dtype_of
from dlis_market.node.errors import NodeError, ProtocolError
from dlis_market.node.sessions import row_bytes
from dlis_market.types import WireModel


@dataclass(frozen=True)
class TranscriptStep:
    position: int  # absolute position of the step's first token
    tokens: int
    data: bytes  # the session's input row: int64 ids [tokens] or hidden [tokens, H], little endian


@dataclass
class Transcript:
    session_id: str
    job_id: bytes
    opened_by: str
    dtype: str = ""  # wire dtype name of the rows ("" until the first step)
    steps: list[TranscriptStep] = field(default_factory=list)
    nbytes: int = 0

    def record(self, inp: StageInput, row: int) -> None:
        data = inp.token_ids if inp.token_ids is not None else inp.hidden
        assert data is not None  # checked by the stage before it ran
        self.dtype = dtype_name(data.dtype)
        blob = row_bytes(data[row])
        self.steps.append(TranscriptStep(inp.positions[row], inp.num_tokens, blob))
        self.nbytes += len(blob)

    def sha256(self) -> bytes:
        """sha256 of the concatenated rows: what the previous stage's receipt signs as its output."""
        h = hashlib.sha256()
        for s in self.steps:
            h.update(s.data)
        return h.digest()

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.steps)

    def inputs(self, session_id: str, first_step: int = 0) -> list[StageInput]:
        """The recorded steps as stage inputs of ``session_id`` (to replay them elsewhere)."""
        dtype = dtype_of(self.dtype)
        out = []
        for i, s in enumerate(self.steps):
            flat = torch.frombuffer(bytearray(s.data), dtype=torch.uint8).view(dtype)
            at = ((session_id,), (s.position,), first_step + i)
            if dtype == torch.int64:
                out.append(StageInput(*at, token_ids=flat.reshape(1, s.tokens)))
            else:
                out.append(StageInput(*at, hidden=flat.reshape(1, s.tokens, -1)))
        return out

    def to_wire(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "job_id": self.job_id,
            "dtype": self.dtype,
            "steps": [{"position": s.position, "tokens": s.tokens, "data": s.data} for s in self.steps],
        }


class _WireStep(WireModel):
    position: int
    tokens: int
    data: bytes


class TranscriptBody(WireModel):
    """The answer to a ``transcript`` request."""

    session_id: str
    job_id: bytes
    dtype: str
    steps: list[_WireStep]

    def transcript(self, opened_by: str) -> Transcript:
        try:
            size = torch.empty((), dtype=dtype_of(self.dtype)).element_size()
        except MessageError as exc:
            raise ProtocolError(str(exc)) from exc
        t = Transcript(self.session_id, self.job_id, opened_by, self.dtype)
        for s in self.steps:
            if s.tokens < 1 or s.position < 0 or len(s.data) % (s.tokens * size):
                raise ProtocolError(
                    f"transcript step at position {s.position} has {len(s.data)} bytes for {s.tokens} tokens of "
                    f"{self.dtype}: not whole rows"
                )
            t.steps.append(TranscriptStep(s.position, s.tokens, s.data))
            t.nbytes += len(s.data)
        return t


class TranscriptRequest(WireModel):
    session_id: str


class TranscriptStore:
    """Transcripts of closed sessions by session id, bounded in age, in bytes and in bytes per opener.

    A new transcript only ever pushes out older transcripts *of its own opener* (oldest first),
    never another opener's: when the others' transcripts fill the store, the new one is not kept.
    So a peer that floods sessions loses its own spot-check evidence, not anyone else's.
    """

    def __init__(
        self,
        max_bytes: int,
        max_age_s: float,
        per_opener_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.per_opener_bytes = max_bytes if per_opener_bytes is None else min(per_opener_bytes, max_bytes)
        self.clock = clock
        self._kept: OrderedDict[str, tuple[float, Transcript]] = OrderedDict()
        self._by_opener: dict[str, int] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, session_id: object) -> bool:
        self._expire()
        return session_id in self._kept

    def bytes_of(self, opener: str) -> int:
        return self._by_opener.get(opener, 0)

    def put(self, transcript: Transcript) -> bool:
        """Keep ``transcript``; False when it cannot be kept (over the per-opener budget alone, or the
        store is full of other openers' transcripts)."""
        self._expire()
        self._drop(transcript.session_id)
        opener, size = transcript.opened_by, transcript.nbytes
        if size > self.per_opener_bytes or self.nbytes - self.bytes_of(opener) + size > self.max_bytes:
            return False  # would not fit even without all of its opener's older ones: keep those
        for sid in [sid for sid, (_, t) in self._kept.items() if t.opened_by == opener]:  # oldest first
            if self.bytes_of(opener) + size <= self.per_opener_bytes and self.nbytes + size <= self.max_bytes:
                break
            self._drop(sid)
        self._kept[transcript.session_id] = (self.clock(), transcript)
        self.nbytes += size
        self._by_opener[opener] = self.bytes_of(opener) + size
        return True

    def get(self, session_id: str, requester: str) -> Transcript:
        self._expire()
        hit = self._kept.get(session_id)
        if hit is None:
            raise NodeError(
                f"no transcript of session {session_id!r} here: never served, still open, or dropped after "
                f"{self.max_age_s:.0f}s / over the {self.max_bytes}-byte budget ({self.per_opener_bytes} per opener)"
            )
        if hit[1].opened_by != requester:
            raise NodeError(f"session {session_id!r} was opened by another peer; only it may read the transcript")
        return hit[1]

    def _drop(self, session_id: str) -> None:
        old = self._kept.pop(session_id, None)
        if old is not None:
            t = old[1]
            self.nbytes -= t.nbytes
            left = self.bytes_of(t.opened_by) - t.nbytes
            if left > 0:
                self._by_opener[t.opened_by] = left
            else:
                self._by_opener.pop(t.opened_by, None)

    def _expire(self) -> None:
        horizon = self.clock() - self.max_age_s
        while self._kept:
            sid, (at, _) = next(iter(self._kept.items()))
            if at >= horizon:
                break
            self._drop(sid)
