"""Fingerprints at a stage: recorded while it decodes, checked with one prefill over the call.

Why: a spot check used to replay a stage call step by step (a full decode). With the call's
fingerprint (:mod:`dlis_market.protocol.fingerprints`) a checker runs the stage's layers ONCE
over every position of the finished call (the call's inputs side by side: token ids for the
first stage, the received hidden states for the others) and compares its hidden states with the
commitment; at the last stage it also re-derives the sampled tokens from the same prefill's logits.

What is fingerprinted is the output of the stage's last decoder layer at every position: the
hidden states a middle stage sends, and at the last stage the states its head reads (before the
final norm), which the tokens alone do not reveal.

Worker side: :class:`FingerprintRecorder` (a forward hook, no change to :class:`Stage`), or
:func:`~dlis_market.protocol.fingerprints.fingerprint_from_steps` over the rows a stage emitted.
Checker side: :func:`check_call`, and for a stage that sends hidden states
:func:`~dlis_market.protocol.fingerprints.commits_to` (the commitment is to what was sent; it
lives with the format, so the broker checks it without loading a model).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from dlis_market.inference.families.base import first_output
from dlis_market.inference.messages import StageInput
from dlis_market.inference.sampling import SamplingParams, adjust_logits, sample_next
from dlis_market.inference.stage import Stage
from dlis_market.protocol.fingerprint_thresholds import Thresholds, Verdict, validate
from dlis_market.protocol.fingerprints import (
    CHUNK_TOKENS,
    DEFAULT_TOPK,
    FingerprintBuilder,
    FingerprintShapeError,
)
from dlis_market.protocol.outputs import IDS_TOKENS_PER_FLIP


class FingerprintRecorder:
    """Records, per session, the output of ``stage``'s last decoder layer on every forward and
    builds each session's fingerprint as it goes.

    Call :meth:`observe` with the same :class:`StageInput` right after each ``stage.forward``,
    :meth:`finish` when the session's call ends (its bytes go into the receipt), and
    :meth:`close` to remove the hook. Rows of a batch are split back per session as
    :meth:`Stage.forward` groups them (one pass, or one per position for stages that cannot pad).
    """

    def __init__(self, stage: Stage, topk: int = DEFAULT_TOPK, chunk_tokens: int = CHUNK_TOKENS) -> None:
        self.stage = stage
        self.topk, self.chunk_tokens = topk, chunk_tokens
        self._captured: list[torch.Tensor] = []
        self._paused = False
        self._builders: dict[str, FingerprintBuilder] = {}
        last_layer = stage.family.get_layers(stage.model)[-1]
        self._hook = last_layer.register_forward_hook(self._capture)

    def _capture(self, _module: Any, _args: Any, output: Any) -> None:
        if not self._paused:
            self._captured.append(first_output(output).detach())

    def rows(self, inp: StageInput) -> list[tuple[str, torch.Tensor]]:
        """The rows the last forward (of ``inp``) produced, per session in batch order: what a
        caller that keeps its own builders (the worker keeps one per session) feeds them."""
        captured, self._captured = self._captured, []
        groups: dict[int, list[int]] = {}
        for row, pos in enumerate(inp.positions):
            groups.setdefault(0 if self.stage.mixes_positions else pos, []).append(row)
        if len(captured) != len(groups):
            raise FingerprintShapeError(
                f"{len(captured)} layer outputs captured for {len(groups)} forward groups: call observe() "
                "once right after each stage.forward"
            )
        out = []
        for rows, layer_out in zip(groups.values(), captured, strict=True):
            for i, r in enumerate(rows):
                out.append((inp.session_ids[r], layer_out[i, -inp.num_tokens :].float().cpu()))
        return out

    def observe(self, inp: StageInput) -> None:
        """Add the rows the last forward (of ``inp``) produced to each session's fingerprint."""
        for sid, rows in self.rows(inp):
            self._builders.setdefault(sid, FingerprintBuilder(self.topk, self.chunk_tokens)).add(rows)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside are not recorded (a check's prefill on the same stage)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def finish(self, session_id: str) -> bytes:
        """The session's fingerprint bytes; forgets the session."""
        builder = self._builders.pop(session_id, None)
        if builder is None:
            raise FingerprintShapeError(f"no rows were recorded for session {session_id!r}")
        return builder.finish().to_bytes()

    def abandon(self, inp: StageInput) -> None:
        """After a ``stage.forward`` that raised: drop what it captured and its sessions' rows
        (the stage closed those sessions; a replay starts them over)."""
        self._captured = []
        for sid in inp.session_ids:
            self._builders.pop(sid, None)

    def discard(self, session_id: str) -> None:
        self._builders.pop(session_id, None)

    def close(self) -> None:
        self._hook.remove()
        self._builders.clear()


@dataclass(frozen=True)
class Prefill:
    """A stage's recomputed last-layer outputs ``[T, H]`` (float32, CPU) and, at the last stage,
    the logits ``[n, V]`` of the last ``n`` positions asked for."""

    hidden: torch.Tensor
    logits: torch.Tensor | None


@torch.inference_mode()
def prefill(stage: Stage, inputs: torch.Tensor, logit_positions: int = 0) -> Prefill:
    """Run ``stage``'s layers once over every position of a call.

    ``inputs``: token ids ``[T]`` for the first stage, the hidden states the stage received
    ``[T, H]`` (every step's rows, concatenated in order) for the others. Uses its own cache, so
    it leaves the stage's sessions alone.
    """
    data = inputs.to(stage.device)
    want_ndim = 1 if stage.is_first else 2
    if data.ndim != want_ndim or data.shape[0] == 0:
        what = "token ids [T]" if stage.is_first else f"hidden states [T, {stage.config.hidden_size}]"
        raise FingerprintShapeError(f"stage {stage.layers} prefills {what}, got shape {tuple(data.shape)}")
    length = int(data.shape[0])
    position_ids = torch.arange(length, dtype=torch.long, device=stage.device).unsqueeze(0)
    cache = DynamicCache(config=stage.stage_config)
    if stage.is_first:
        hidden = stage.family.embed(stage.model, data.unsqueeze(0), position_ids)
    else:
        hidden = data.unsqueeze(0).to(stage.dtype)
    hidden = stage.family.run_layers(stage.model, hidden, position_ids, cache, stage.stage_config)
    logits = None
    if stage.is_last and logit_positions > 0:
        rows = hidden[0, length - logit_positions :].unsqueeze(1)  # [n, 1, H]: the head reads position -1
        logits = stage.family.head(stage.model, rows)[:, -1, :].float().cpu()
    return Prefill(hidden[0].float().cpu(), logits)


@dataclass(frozen=True)
class CallCheck:
    """A checked call: the fingerprint's verdict and, at the last stage, the tokens' re-derivation."""

    fingerprint: Verdict
    tokens_checked: int = 0
    token_flips: int = 0  # committed tokens that differ from the recomputed picks
    implausible_tokens: int = 0  # of those, the ones no near-tie explains
    prefill_s: float = 0.0

    @property
    def allowed_flips(self) -> int:
        return self.tokens_checked // IDS_TOKENS_PER_FLIP

    @property
    def accepted(self) -> bool:
        return self.fingerprint.accepted and self.implausible_tokens <= self.allowed_flips

    @property
    def reason(self) -> str:
        parts = [] if self.fingerprint.accepted else [self.fingerprint.reason]
        if self.implausible_tokens > self.allowed_flips:
            parts.append(
                f"{self.implausible_tokens} of {self.tokens_checked} sampled tokens are implausible under the "
                f"recomputed logits (at most {self.allowed_flips} allowed; {self.token_flips} differ)"
            )
        return "; ".join(parts) or "accepted"


TIE_LOGITS = 1.0  # greedy: a committed token this close (in logits) to the recomputed best is a near-tie
MIN_PROB = 1e-3  # sampled: a committed token at least this likely (after bias, penalties, temperature)


def replay_tokens(logits: torch.Tensor, committed: Sequence[int], sampling: SamplingParams) -> tuple[int, int]:
    """(differing, implausible) ``committed`` tokens against what ``sampling`` picks from
    ``logits`` ``[n, V]``, teacher-forced: the seeded generator and penalty history advance as in
    the call. A differing token is excused (not implausible) when it is a near-tie under greedy
    (within :data:`TIE_LOGITS`) or at least :data:`MIN_PROB` likely under sampling: another
    precision moves the logits, and with them which token a draw lands on."""
    generator = sampling.generator()
    history: list[int] = []
    differ = implausible = 0
    for row, token in zip(logits, committed, strict=True):
        picked = sample_next(row, sampling, generator, history)
        if picked != token:
            differ += 1
            scores = adjust_logits(row, sampling, history).float()
            if sampling.greedy:
                implausible += bool(scores[picked] - scores[token] > TIE_LOGITS)
            else:
                implausible += bool((scores / sampling.temperature).softmax(-1)[token] < MIN_PROB)
        history.append(int(token))
    return differ, implausible


def check_call(
    stage: Stage,
    inputs: torch.Tensor,
    fingerprint: bytes,
    thresholds: Thresholds,
    generated: Sequence[int] = (),
    sampling: SamplingParams | None = None,
) -> CallCheck:
    """Validate one stage call from its fingerprint with one prefill.

    ``inputs``: what the stage ran, all positions (see :func:`prefill`). At the last stage,
    ``generated`` are the tokens the call returned (the last ``len(generated)`` positions of
    ``inputs`` predict them) and ``sampling`` the session's params (greedy if None).
    Raises :class:`~dlis_market.protocol.fingerprints.FingerprintFormatError` /
    :class:`~dlis_market.protocol.fingerprints.FingerprintShapeError` for bytes that are no
    fingerprint of a call this long.
    """
    t = time.perf_counter()
    result = prefill(stage, inputs, len(generated) if stage.is_last else 0)
    verdict = validate(fingerprint, result.hidden, thresholds)
    flips = implausible = 0
    if result.logits is not None:
        flips, implausible = replay_tokens(result.logits, generated, sampling or SamplingParams())
    checked = len(generated) if result.logits is not None else 0
    return CallCheck(verdict, checked, flips, implausible, time.perf_counter() - t)
