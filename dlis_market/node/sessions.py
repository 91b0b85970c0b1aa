"""Worker-side session table and the batching of queued steps into forward passes.

A stage keeps, next to the KV cache the inference ``Stage`` holds, each session's route facts
(who gets its output, who opened it) and its receipt ledger. Steps that arrive while the stage
is busy queue up; :func:`plan_batches` merges the queued inputs of different sessions into one
``StageInput`` per token count, after checking each input alone, so that one bad input (unknown
session, wrong position, wrong shape) is refused without touching the others. Positions need not
match: the stage runs sessions at different positions in one forward pass (continuous batching,
``inference/kv_cache.py``), except on stages with sliding-window layers, which split by position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dlis_market.errors import DlisError
from dlis_market.inference.messages import StageInput
from dlis_market.node.receipts import ReceiptLedger
from dlis_market.protocol.fingerprints import FingerprintBuilder

# how long a stage after the first waits for the rest of a pass's rows (node/server.py Worker._gather;
# the simulator's stage servers wait as long, sim/passes.py)
RELAY_WAIT_S = 0.004
# with node.merge_groups, how many measured pipeline cycles the first stage waits at most for the
# steps of its other sessions (one cycle brings every group round; the rest is jitter)
MERGE_CYCLES = 1.25
# with node.merge_groups, after how many measured cycles the first stage waits again for a session it
# waited for in vain: a group that missed one wait (while the cycle estimate was still that of fewer
# sessions) would otherwise travel apart for the rest of its generation
LATE_RETRY_CYCLES = 8.0


@dataclass
class WorkerSession:
    session_id: str
    reply_to: str  # peer id that gets tokens (last stage) and failures
    next_peer: str | None  # None at the last stage
    opened_by: str
    ledger: ReceiptLedger
    fingerprint: FingerprintBuilder = field(default_factory=FingerprintBuilder)  # signed at close
    adapter_id: str | None = None  # the LoRA adapter it applies (node/adapters.py)
    head_rows: list[torch.Tensor] | None = None  # a zk session: the head's input rows per step, proven at close


@dataclass
class QueuedStep:
    inp: StageInput
    reply_to: str
    sender: str
    on_error: Callable[[str], object] | None = None


@dataclass
class Batch:
    steps: list[QueuedStep] = field(default_factory=list)

    def merged(self) -> StageInput:
        if len(self.steps) == 1:
            return self.steps[0].inp
        first = self.steps[0].inp
        ids = tuple(s for q in self.steps for s in q.inp.session_ids)
        positions = tuple(p for q in self.steps for p in q.inp.positions)
        want_logits = any(q.inp.want_logits for q in self.steps)
        if first.token_ids is not None:
            tokens = torch.cat([q.inp.token_ids for q in self.steps if q.inp.token_ids is not None])
            return StageInput(ids, positions, first.step, token_ids=tokens, want_logits=want_logits)
        hidden = torch.cat([q.inp.hidden for q in self.steps if q.inp.hidden is not None])
        return StageInput(ids, positions, first.step, hidden=hidden, want_logits=want_logits)


def plan_batches(
    queued: Sequence[QueuedStep],
    check: Callable[[StageInput], object],
    max_sessions: int,
) -> tuple[list[Batch], list[tuple[QueuedStep, str]], list[QueuedStep]]:
    """Split queued steps into (batches, refused with a reason, deferred to the next round).

    ``check`` raises a DlisError when an input cannot run (it must not change state). A session
    appears at most once per round; a later step of the same session waits for the next round.
    """
    batches: dict[tuple[bool, int, torch.dtype | None], Batch] = {}
    refused: list[tuple[QueuedStep, str]] = []
    deferred: list[QueuedStep] = []
    seen: set[str] = set()
    count = 0
    for q in queued:
        sids = set(q.inp.session_ids)
        if sids & seen or (count + len(sids) > max_sessions and count > 0):
            deferred.append(q)
            continue
        if len(sids) != len(q.inp.session_ids):
            refused.append((q, "the same session appears twice in one input"))
            continue
        try:
            check(q.inp)
        except DlisError as exc:
            refused.append((q, str(exc)))
            continue
        seen |= sids
        count += len(sids)
        is_tokens = q.inp.token_ids is not None
        dtype = None if q.inp.hidden is None else q.inp.hidden.dtype
        batches.setdefault((is_tokens, q.inp.num_tokens, dtype), Batch()).steps.append(q)
    return list(batches.values()), refused, deferred


def row_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
