"""Fingerprint checks over the wire: a replica validates a finished stage call with one prefill.

Every stage signs, with its receipt, a fingerprint of the activations of the call
(:class:`dlis_market.node.receipts.Commitment`). A spot-check runner that draws the call sends
the call's inputs (every position: token ids at the first stage, the hidden states the stage
received after it), the fingerprint and, at the last stage, the tokens it returned, to a replica
serving the same range (the ``fingerprint_check`` op). The replica runs its layers once over all
positions (:func:`dlis_market.inference.fingerprint_check.check_call`) and answers whether the
fingerprint (and the tokens) fit; the runner escalates a rejection to a full re-execution, whose
evidence the oracle judges (``broker/spot_checks.py``). One prefill instead of a decode per
token is what lets a runner check many more calls for the same compute.

Like the ``open`` op, the request carries a broker's session ticket for the call's job and range:
a stranger cannot make a worker spend prefills.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from dlis_market.inference.messages import StageInput, decode, encode
from dlis_market.inference.sampling import SamplingParams
from dlis_market.node.errors import ProtocolError
from dlis_market.node.protocol import parse_body
from dlis_market.protocol.adapters import AdapterRef
from dlis_market.protocol.fingerprint_thresholds import thresholds_for
from dlis_market.protocol.routes import RouteHop
from dlis_market.types import WireModel

if TYPE_CHECKING:  # the replica's side loads them; a broker that only sends checks does not
    from dlis_market.inference.fingerprint_check import CallCheck, FingerprintRecorder
    from dlis_market.inference.stage import Stage


class FingerprintCheckBody(WireModel):
    """Validate one finished stage call of ``job_id`` on layers [start, end) of ``model``."""

    model: str
    start: int = Field(ge=0, lt=2**32)
    end: int = Field(ge=1, lt=2**32)
    job_id: bytes
    ticket: dict[str, Any] | None = None  # protocol.tickets.SignedTicket for this job and range
    inputs: bytes  # inference.messages StageInput holding every position of the call
    fingerprint: bytes  # what the accused signed (node.receipts.Commitment)
    generated: list[int] = Field(default_factory=list)  # last stage: the tokens the call returned
    sampling: dict[str, Any] = Field(default_factory=dict)  # SamplingParams of the session
    adapter: dict[str, Any] | None = None  # protocol.adapters.AdapterRef the call applied


class FingerprintCheckAnswer(WireModel):
    accepted: bool
    reason: str
    margin: float  # worst chunk's measure / threshold (< 1: within)
    tokens_checked: int
    token_flips: int
    implausible_tokens: int
    prefill_s: float
    node_address: str

    @classmethod
    def of(cls, check: CallCheck, node_address: str) -> FingerprintCheckAnswer:
        return cls(
            accepted=check.accepted, reason=check.reason, margin=check.fingerprint.margin,
            tokens_checked=check.tokens_checked, token_flips=check.token_flips,
            implausible_tokens=check.implausible_tokens, prefill_s=check.prefill_s, node_address=node_address,
        )  # fmt: skip


def call_inputs(steps: list[StageInput]) -> torch.Tensor:
    """Every position of a call, in order, from its steps: token ids ``[T]`` or hidden ``[T, H]``."""
    if steps[0].token_ids is not None:
        return torch.cat([s.token_ids.reshape(-1) for s in steps if s.token_ids is not None])
    return torch.cat([s.hidden.reshape(-1, s.hidden.shape[-1]) for s in steps if s.hidden is not None])


def run_check(
    stage: Stage,
    recorder: FingerprintRecorder | None,
    req: FingerprintCheckBody,
    max_bytes: int,
    max_tokens: int,
    applied: contextlib.AbstractContextManager[None] | None = None,
) -> CallCheck:
    """The replica's side (blocking: run it in a thread, never beside the stage's own forward).
    ProtocolError for inputs that do not fit this stage; FingerprintError for fingerprint bytes
    that do not parse or describe another call."""
    from dlis_market.inference.fingerprint_check import check_call

    msg = decode(req.inputs, max_bytes)
    if not isinstance(msg, StageInput):
        raise ProtocolError("a fingerprint check carries the call's stage input, not an output")
    data = call_inputs([msg])
    if data.shape[0] > max_tokens:
        raise ProtocolError(f"the call has {data.shape[0]} positions; this stage checks at most {max_tokens}")
    vocab = int(stage.config.vocab_size)
    if stage.is_first:
        if msg.token_ids is None or (data.numel() and (int(data.min()) < 0 or int(data.max()) >= vocab)):
            raise ProtocolError(f"the first stage checks token ids in [0, {vocab})")
    elif msg.hidden is None or data.shape[-1] != stage.config.hidden_size:
        raise ProtocolError(f"stage {stage.layers} checks hidden states of width {stage.config.hidden_size}")
    if any(not 0 <= t < vocab for t in req.generated):
        raise ProtocolError(f"generated token ids must be in [0, {vocab})")
    try:
        sampling = SamplingParams.model_validate(req.sampling) if req.sampling else SamplingParams()
    except ValueError as exc:
        raise ProtocolError(f"malformed sampling: {exc}") from exc
    thresholds = thresholds_for(stage.manifest.dtype)
    # the prefill runs through the recorded layer: not a session's rows; with the call's adapter
    paused = recorder.paused() if recorder is not None else contextlib.nullcontext()
    with paused, applied or contextlib.nullcontext():
        return check_call(stage, data, req.fingerprint, thresholds, req.generated, sampling)


def check_body(
    hop: RouteHop,
    model: str,
    job_id: bytes,
    ticket: dict[str, Any],
    steps: list[StageInput],
    fingerprint: bytes,
    generated: list[int],
    sampling: SamplingParams,
    adapter: AdapterRef | None = None,
) -> dict[str, Any]:
    """The request a runner sends to ``hop`` (a replica) to check one call."""
    inputs = call_inputs(steps)
    sid = steps[0].session_ids
    if steps[0].token_ids is not None:
        msg = StageInput(sid, (0,), 0, token_ids=inputs.reshape(1, -1))
    else:
        msg = StageInput(sid, (0,), 0, hidden=inputs.reshape(1, *inputs.shape))
    body = FingerprintCheckBody(
        model=model, start=hop.start, end=hop.end, job_id=job_id, ticket=ticket, inputs=encode(msg),
        fingerprint=fingerprint, generated=list(generated),
        sampling=sampling.model_copy(update={"logprobs": None}).model_dump(),
        adapter=adapter.model_dump() if adapter is not None else None,
    )  # fmt: skip
    return body.model_dump()


def parse_answer(raw: Any) -> FingerprintCheckAnswer:
    return parse_body(FingerprintCheckAnswer, raw)
