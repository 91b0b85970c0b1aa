"""Re-executing one stage call of a finished session on another worker (the spot check's legwork).

:func:`token_steps` rebuilds what the first stage ran from the session's tokens; for later
stages :func:`checked` takes the transcript the stage itself kept (``node/transcripts.py``), checks
its bytes against the previous stage's signed receipt and cuts them into the runner's own
:class:`Layout` (steps, hidden size, dtype: nothing about their shape is taken from a stage).
What the accused sent is, likewise, the tokens for the last stage or the next stage's transcript
checked against the accused's own receipt.
:func:`replay` opens a fresh session with the same job id on a replica serving the same range,
feeds it the same steps one by one with this driver as its next peer, collects its outputs and
its signed receipt. A replica could tell a replay from a job (the job has finished; a middle
stage's next peer is the broker), so checkers are staked nodes whose own calls are checked too,
and the oracle can require a referee of a third operator.
:func:`check_on` is the cheap look that comes first: a replica validates the call from the
accused's signed fingerprint with one prefill (``node/call_checks.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dlis_market.chain.job_market import SignedReceipt
from dlis_market.inference.messages import StageInput, dtype_name, dtype_of, encode
from dlis_market.inference.sampling import SamplingParams, TokenLogprob
from dlis_market.node import receipts
from dlis_market.node.call_checks import FingerprintCheckAnswer, check_body, parse_answer
from dlis_market.node.driver import PipelineDriver
from dlis_market.node.errors import NodeError, ReceiptError, StageFailedError
from dlis_market.node.protocol import OpenBody, SamplingUnsupportedError, parse_body
from dlis_market.node.sessions import row_bytes
from dlis_market.node.transcripts import Transcript, TranscriptBody
from dlis_market.protocol.adapters import AdapterRef
from dlis_market.protocol.routes import RouteHop


class TranscriptMismatchError(NodeError):
    """A transcript does not hash to what the signed receipt it must match says."""


@dataclass(frozen=True)
class StageRows:
    """A stage call's inputs or outputs: one row per step, all of one wire dtype."""

    dtype: str
    rows: list[bytes]
    inputs: list[StageInput]  # the same rows as stage inputs (for inputs only; empty for outputs)
    width: int = 1  # values per token: the hidden size (1 for token ids); spot checks compare per token

    @property
    def data(self) -> bytes:
        return b"".join(self.rows)

    def sha256(self) -> bytes:
        return hashlib.sha256(self.data).digest()


def token_rows(token_ids: Sequence[int]) -> list[bytes]:
    return [row_bytes(torch.tensor(t, dtype=torch.long)) for t in token_ids]


def token_steps(session_id: str, prompt_ids: Sequence[int], generated: Sequence[int]) -> StageRows:
    """The first stage's inputs of a session without failover: the prompt as one prefill, then
    every generated token but the last, one per step."""
    inputs = [StageInput((session_id,), (0,), 0, token_ids=torch.tensor([list(prompt_ids)], dtype=torch.long))]
    for j, t in enumerate(generated[:-1]):
        pos = len(prompt_ids) + j
        inputs.append(StageInput((session_id,), (pos,), j + 1, token_ids=torch.tensor([[t]], dtype=torch.long)))
    rows = [row_bytes(i.token_ids[0]) for i in inputs if i.token_ids is not None]
    return StageRows("int64", rows, inputs)


async def fetch_transcript(driver: PipelineDriver, peer_id: str, session_id: str) -> Transcript:
    answer = await driver.pool.request(
        peer_id, "transcript", {"session_id": session_id}, driver.settings.request_timeout_s
    )
    return parse_body(TranscriptBody, answer).transcript(driver.peer_id)


class TranscriptMalformedError(NodeError):
    """A transcript's bytes do not fit the session (token count, hidden size, dtype)."""


@dataclass(frozen=True)
class Layout:
    """How a session's rows split into steps, known to the runner without asking any stage: the
    prompt as one prefill at position 0, then one token per step; ``width`` values of ``dtype``
    per token (the hidden size; 1 for token ids)."""

    steps: tuple[tuple[int, int], ...]  # (position, tokens) per step
    dtype: str
    width: int

    @classmethod
    def of_session(cls, prompt_tokens: int, generated: int, dtype: str, width: int) -> Layout:
        steps = ((0, prompt_tokens), *((prompt_tokens + j, 1) for j in range(max(generated - 1, 0))))
        return cls(steps, dtype, width)

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.steps)


def checked(transcript: Transcript, signed_hash: bytes, layout: Layout, what: str) -> StageRows:
    """The transcript's bytes cut into the runner's ``layout``, if they hash to ``signed_hash``
    (a receipt's outputHash) and fit it. Only the bytes come from the stage: how they split into
    steps and tokens, and their dtype, are the runner's, so a stage cannot reshape what is compared.
    """
    got = transcript.sha256()
    if got != signed_hash:
        raise TranscriptMismatchError(
            f"{what}: the transcript of session {transcript.session_id} hashes to 0x{got.hex()} but the signed "
            f"receipt says 0x{signed_hash.hex()}; one of the two stages sent something else than it signed"
        )
    data = b"".join(s.data for s in transcript.steps)
    dtype = dtype_of(layout.dtype)
    size = torch.empty((), dtype=dtype).element_size()
    per_token = layout.width * size
    if len(data) != layout.tokens * per_token:
        raise TranscriptMalformedError(
            f"{what}: the transcript of session {transcript.session_id} has {len(data)} bytes, not "
            f"{layout.tokens} tokens x {layout.width} values x {size} bytes of {layout.dtype}"
        )
    rows, inputs, at = [], [], 0
    for i, (position, tokens) in enumerate(layout.steps):
        row = data[at : at + tokens * per_token]
        at += len(row)
        rows.append(row)
        flat = torch.frombuffer(bytearray(row), dtype=torch.uint8).view(dtype)
        sid = (transcript.session_id,)
        if layout.width == 1 and dtype == torch.int64:
            inputs.append(StageInput(sid, (position,), i, token_ids=flat.reshape(1, tokens)))
        else:
            inputs.append(StageInput(sid, (position,), i, hidden=flat.reshape(1, tokens, layout.width)))
    return StageRows(layout.dtype, rows, inputs, layout.width)


async def replay(
    driver: PipelineDriver,
    replica: RouteHop,
    model: str,
    job_id: bytes,
    steps: Sequence[StageInput],
    max_length: int,
    sampling: SamplingParams,
    last: bool,
    adapter: AdapterRef | None = None,
) -> tuple[StageRows, SignedReceipt]:
    """Run ``steps`` on ``replica`` in a fresh session of ``job_id``; its outputs and receipt."""
    node = await driver.verify_peer(replica)
    sid = f"{job_id.hex()[:16]}-{uuid.uuid4().hex[:12]}"
    # The job's own sampling (a last stage applies the same seed, bias and penalties, so it samples
    # the same tokens), without log probabilities: they are not part of what is compared.
    s = sampling.model_copy(update={"logprobs": None})
    body = OpenBody.build(
        s, last, session_id=sid, model=model, start=replica.start, end=replica.end, max_length=max_length,
        job_id=job_id, reply_to=driver.peer_id, next_peer=None if last else driver.peer_id,
        ticket=driver.ticket(job_id, model, replica), adapter=adapter.model_dump() if adapter is not None else None,
    )  # fmt: skip
    timeout = driver.settings.request_timeout_s
    answer = await driver.pool.request(replica.peer_id, "open", body.wire(), timeout)
    missing = s.features - set(answer.get("sampling") or ()) if last else frozenset()
    if missing:  # a replica that would sample without them would accuse an honest stage
        with contextlib.suppress(NodeError):
            await driver.pool.request(replica.peer_id, "close", {"session_id": sid}, timeout)
        raise SamplingUnsupportedError(
            f"replica {replica.peer_id} does not apply {', '.join(sorted(missing))}; choose another referee",
            replica.peer_id,
        )
    rows: list[bytes] = []
    dtype, width = "int64", 1
    try:
        for step in steps:
            inp = StageInput(
                (sid,), step.positions, step.step, token_ids=step.token_ids, hidden=step.hidden,
                want_logits=step.want_logits,
            )  # fmt: skip
            with driver.awaiting(sid, frozenset({replica.peer_id})) as fut:
                await driver.pool.send(replica.peer_id, "step", {"input": encode(inp), "reply_to": driver.peer_id})
                try:
                    out = await asyncio.wait_for(fut, driver.settings.step_timeout_s)
                except TimeoutError:
                    raise StageFailedError(
                        f"replica {replica.peer_id} gave no output within {driver.settings.step_timeout_s:.0f}s",
                        replica.peer_id,
                    ) from None
            if isinstance(out, TokenLogprob):
                out = out.token
            if isinstance(out, torch.Tensor):
                dtype, width = dtype_name(out.dtype), int(out.shape[-1])
                rows.append(row_bytes(out))
            else:
                rows.append(row_bytes(torch.tensor(int(out), dtype=torch.long)))
    except BaseException:
        with contextlib.suppress(NodeError):  # best effort: the session expires on the replica anyway
            await driver.pool.request(replica.peer_id, "close", {"session_id": sid}, timeout)
        raise
    answer = await driver.pool.request(replica.peer_id, "close", {"session_id": sid}, timeout)
    signed = receipts.from_wire(answer.get("receipt"))
    receipts.verify_receipt(driver.market, signed, node)
    result = StageRows(dtype, rows, [], width)
    if signed.receipt.output_hash != result.sha256():
        raise ReceiptError(
            f"replica {replica.peer_id} signed output 0x{signed.receipt.output_hash.hex()} but sent rows hashing to "
            f"0x{result.sha256().hex()}"
        )
    return result, signed


async def check_on(
    driver: PipelineDriver,
    replica: RouteHop,
    model: str,
    job_id: bytes,
    steps: list[StageInput],
    fingerprint: bytes,
    generated: Sequence[int],
    sampling: SamplingParams,
    adapter: AdapterRef | None = None,
) -> FingerprintCheckAnswer:
    """Have ``replica`` validate a call (its inputs ``steps``, the accused's ``fingerprint`` and,
    at the last stage, the ``generated`` tokens) with one prefill; its answer."""
    node = await driver.verify_peer(replica)
    ticket = driver.ticket(job_id, model, replica)
    body = check_body(replica, model, job_id, ticket, steps, fingerprint, list(generated), sampling, adapter)
    raw = await driver.pool.request(replica.peer_id, "fingerprint_check", body, driver.settings.request_timeout_s)
    answer = parse_answer(raw)
    if answer.node_address.lower() != node.lower():
        raise ReceiptError(f"replica {replica.peer_id} answered as {answer.node_address}, not as its node {node}")
    return answer
