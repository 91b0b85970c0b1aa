"""Re-executing one stage call of a finished session on another worker (the spot check's legwork).

:func:`stage_inputs` rebuilds what the accused stage ran: the token steps of the session for the
first stage, or the transcript the stage itself kept (``node/transcripts.py``), checked against
the previous stage's signed receipt. :func:`stage_outputs` gets what the accused sent: the tokens
for the last stage, or the next stage's transcript, checked against the accused's own receipt.
:func:`replay` opens a fresh session with the same job id on a replica serving the same range,
feeds it the same steps one by one with this driver as its next peer, collects its outputs and
its signed receipt. The replica cannot tell a replay from a job.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dlis_market.chain.job_market import SignedReceipt
from dlis_market.inference.messages import StageInput, dtype_name, encode
from dlis_market.inference.sampling import SamplingParams
from dlis_market.node import receipts
from dlis_market.node.driver import PipelineDriver
from dlis_market.node.errors import NodeError, ReceiptError
from dlis_market.node.protocol import OpenBody, parse_body
from dlis_market.node.routing import Hop
from dlis_market.node.sessions import row_bytes
from dlis_market.node.transcripts import Transcript, TranscriptBody


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


def checked(transcript: Transcript, signed_hash: bytes, what: str) -> StageRows:
    """The transcript's rows, if they hash to ``signed_hash`` (a receipt's outputHash)."""
    got = transcript.sha256()
    if got != signed_hash:
        raise TranscriptMismatchError(
            f"{what}: the transcript of session {transcript.session_id} hashes to 0x{got.hex()} but the signed "
            f"receipt says 0x{signed_hash.hex()}; one of the two stages sent something else than it signed"
        )
    inputs = transcript.inputs(transcript.session_id)
    width = 1
    if inputs and inputs[0].hidden is not None:
        width = int(inputs[0].hidden.shape[-1])
    return StageRows(transcript.dtype, [s.data for s in transcript.steps], inputs, width)


async def replay(
    driver: PipelineDriver,
    replica: Hop,
    model: str,
    job_id: bytes,
    steps: Sequence[StageInput],
    max_length: int,
    sampling: SamplingParams,
    last: bool,
) -> tuple[StageRows, SignedReceipt]:
    """Run ``steps`` on ``replica`` in a fresh session of ``job_id``; its outputs and receipt."""
    node = await driver.verify_peer(replica)
    sid = f"{job_id.hex()[:16]}-{uuid.uuid4().hex[:12]}"
    s = sampling
    body = OpenBody(
        session_id=sid, model=model, start=replica.start, end=replica.end, max_length=max_length, job_id=job_id,
        reply_to=driver.peer_id, next_peer=None if last else driver.peer_id, greedy=s.greedy,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed,
    )  # fmt: skip
    timeout = driver.settings.request_timeout_s
    await driver.pool.request(replica.peer_id, "open", body.model_dump(), timeout)
    rows: list[bytes] = []
    dtype, width = "int64", 1
    try:
        for step in steps:
            inp = StageInput(
                (sid,), step.positions, step.step, token_ids=step.token_ids, hidden=step.hidden,
                want_logits=step.want_logits,
            )  # fmt: skip
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            driver._waiters[sid] = (fut, frozenset({replica.peer_id}))
            try:
                await driver.pool.send(replica.peer_id, "step", {"input": encode(inp), "reply_to": driver.peer_id})
                out = await asyncio.wait_for(fut, driver.settings.step_timeout_s)
            finally:
                driver._waiters.pop(sid, None)
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
