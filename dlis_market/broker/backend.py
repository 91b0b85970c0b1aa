"""What the broker needs from the inference network, and its implementation over the P2P driver.

The service only sees :class:`InferenceBackend`; :class:`P2PBackend` drives worker pipelines
through ``dlis_market.node.driver`` (DHT discovery, push-mode streams, failover with replay) and
hands back the stages' signed receipts. Settlement asks the nodes of a batch to sign one Merkle
batch receipt each through a :class:`BatchSigner`, which a backend provides (:class:`SignsBatches`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from dlis_market.chain.job_market import SignedReceipt
from dlis_market.inference.sampling import SamplingParams, TokenLogprob
from dlis_market.protocol.adapters import AdapterRef
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import Replan, RouteHop
from dlis_market.protocol.spans import SpanRecord

# The service's check of a proven job's last receipt, given the prompt and the generated ids.
ProofCheck = Callable[[StageReceipt, Sequence[int], Sequence[int]], Awaitable[None]]


@dataclass(frozen=True)
class BackendJob:
    job_id: bytes
    model: str
    prompt_ids: list[int]
    max_new_tokens: int
    max_cost: int
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    logprobs: int | None = None  # None: none; k: the sampled token's and the k most likely tokens'
    stop_token_ids: tuple[int, ...] = ()
    num_layers: int | None = None
    route: Sequence[RouteHop] | None = None
    fee_bps: int = 0  # JobMarket's protocol fee: max_cost bounds receipts plus this fee
    # The broker's router for failovers: (current route, peers to avoid) -> a new route under the
    # job's policy and max cost. None: the backend's own routing.
    replan: Replan | None = None
    adapter: AdapterRef | None = None  # a LoRA adapter every stage applies (protocol/adapters.py)
    proof: Literal["zk"] | None = None  # the last stage proves its head (broker/zk_proofs.py)
    # Checks the last stage's proof before the answer is accepted; raises to fail the job. None:
    # the job asked for no proof.
    check_proof: ProofCheck | None = None
    # privacy=high: the model's first stage runs here on secret shares at these workers (the
    # planned pair), loaded from this folder; ``route`` starts after it (node/private_entry.py)
    private_shares: Sequence[RouteHop] = ()
    private_shard_dir: Path | None = None
    # (survivor, peers to avoid, max price) -> a replacement for a failed share worker under the
    # job's policy (None: the backend's own pick)
    private_partner: Callable[[RouteHop, frozenset[str], int], Awaitable[RouteHop]] | None = None

    @property
    def sampling(self) -> SamplingParams:
        """The last stage's sampler settings for this job."""
        return SamplingParams(
            greedy=self.greedy, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias, logprobs=self.logprobs,
        )  # fmt: skip


class JobStream(Protocol):
    def tokens(self) -> AsyncIterator[int | TokenLogprob]:
        """The generated tokens: ids, or (when the job asked for ``logprobs``) each token with its
        log probabilities; a stream that sends bare ids for such a job fails it."""
        ...

    async def finish(self) -> tuple[list[RouteHop], list[StageReceipt]]:
        """The final route and the stages' receipts, each checked against the node that signed it."""
        ...


class InferenceBackend(Protocol):
    async def offers(self, model: str) -> list[SpanRecord]:
        """The signed span records of the workers serving ``model`` that can take a session now
        (online, not banned): what the scheduler plans over."""
        ...

    async def start(self, job: BackendJob) -> JobStream: ...

    async def unclaimed(self, job_id: bytes, peers: Sequence[str]) -> list[StageReceipt]:
        """Every stage receipt ``peers`` kept for ``job_id`` because the job's opener (a previous
        broker process) vanished before closing its sessions, with the peer it came from."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class BatchSigningRequest:
    """What one node of a settlement batch is asked to sign its ``BatchReceipt`` over."""

    node: str  # the node's signing address (its receipts' signer)
    peer_id: str | None  # where to reach it (NodeRegistry); None: unknown, it cannot be asked
    receipts: Sequence[SignedReceipt]  # its receipts in the batch, in batch order


@dataclass(frozen=True)
class BatchSignatures:
    """The nodes' answers: node -> 65-byte signature over its ``BatchReceipt`` (the settler
    rebuilds the receipt and checks it), and node -> why it gave none (refused, unreachable,
    timed out)."""

    signatures: dict[str, bytes]
    refusals: dict[str, str]


class BatchSigner(Protocol):
    """The settler's node-signing step for Merkle settlement (``JobMarket.settleBatchMerkle``).

    Called from the settler's thread, never from an event loop; answers within its timeout, with a
    refusal for every node that did not answer in time."""

    def sign_batches(
        self, broker: str, batch_id: bytes, requests: Sequence[BatchSigningRequest]
    ) -> BatchSignatures: ...


@runtime_checkable
class SignsBatches(Protocol):
    """A backend whose nodes can be asked for batch receipts (the broker settles through the
    Merkle path with it; without one, every batch settles per receipt)."""

    def batch_signer(self, timeout_s: float) -> BatchSigner: ...
