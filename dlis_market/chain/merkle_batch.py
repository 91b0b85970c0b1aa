"""Merkle batch receipts of ``JobMarket.settleBatchMerkle``: every node signs one
:class:`BatchReceipt` over the Merkle root of its stages' receipt leaves in a batch.

The leaves, the tree (:func:`merkle_root`, OpenZeppelin's commutative hashing, an odd last element
carried up) and the packed stage words are built here exactly as the contract rebuilds them;
tests/integration/chain/test_merkle_settlement.py and tests/contracts/test_market_merkle.py check
them against it. The one-word stage packing is shared with ``JobMarket.settleJob`` (one job alone,
on its stages' own receipt signatures): :func:`single_job_args`. The binding that sends a batch is
:mod:`dlis_market.chain.job_market`, which re-exports these names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi import encode
from eth_utils import keccak
from web3 import Web3

from dlis_market.chain.errors import PreflightError
from dlis_market.chain.market_messages import JobAuthorization, Receipt, SignedJob, receipt_signer
from dlis_market.chain.typed_data import CompactSignature, Domain, sign_typed, type_hash

_RECEIPT_FIELDS = ["bytes32", "bytes32", "bytes32", "uint32", "uint32", "uint32", "bytes32", "uint256"]


def receipt_leaf(receipt: Receipt) -> bytes:
    """The EIP-712 struct hash of ``receipt``: its leaf in the node's batch tree (what
    ``settleBatchMerkle`` computes on chain from the stage's fields)."""
    r = receipt
    values = [type_hash("Receipt"), r.job_id, r.model_id, r.start, r.end, r.tokens, r.output_hash, r.amount]
    return bytes(keccak(encode(_RECEIPT_FIELDS, values)))


def _pair(a: bytes, b: bytes) -> bytes:
    """OpenZeppelin's ``Hashes.commutativeKeccak256``: the smaller hash first."""
    return bytes(keccak(a + b if a < b else b + a))


def _parents(level: list[bytes]) -> list[bytes]:
    """The next level up: pairs (2i, 2i+1) hashed, an odd last element carried up."""
    up = [_pair(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        up.append(level[-1])
    return up


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root of ``leaves`` in order, as ``JobMarket._merkleRoot``: pairs (2i, 2i+1) hashed
    commutatively, an odd last element carried up; one leaf is its own root, none is 32 zero bytes."""
    level = list(leaves)
    if not level:
        return bytes(32)
    while len(level) > 1:
        level = _parents(level)
    return level[0]


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The sibling hashes from leaf ``index`` up to :func:`merkle_root` (levels where the node is
    carried up add none): what OpenZeppelin ``MerkleProof.verify`` takes to show one job's stage is
    under a node's signed root."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index} outside a tree of {len(leaves)} leaves")
    level, proof = list(leaves), []
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        level, index = _parents(level), index // 2
    return proof


def verify_merkle_proof(leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    """OpenZeppelin ``MerkleProof.verify`` (commutative hashing)."""
    h = leaf
    for sibling in proof:
        h = _pair(h, sibling)
    return h == root


@dataclass(frozen=True)
class BatchReceipt:
    """A node's one EIP-712 receipt for all its stages in a ``settleBatchMerkle`` batch."""

    node: str
    broker: str
    batch_id: bytes
    root: bytes
    total: int
    count: int

    def message(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "broker": self.broker,
            "batchId": self.batch_id,
            "root": self.root,
            "total": self.total,
            "count": self.count,
        }


@dataclass(frozen=True)
class SignedBatchReceipt:
    receipt: BatchReceipt
    signature: CompactSignature

    def as_tuple(self) -> tuple[Any, ...]:
        b = self.receipt
        return (b.node, b.root, b.total, b.count, self.signature.r, self.signature.vs)


@dataclass(frozen=True)
class MerkleJob:
    """A job for ``settleBatchMerkle``: the client's authorization and its stages as (node
    address, receipt) in layer order. The stages carry no signature: each node signs one
    :class:`BatchReceipt` for the whole batch."""

    authorization: JobAuthorization
    signature: CompactSignature
    stages: Sequence[tuple[str, Receipt]]

    @classmethod
    def from_signed(cls, job: SignedJob, domain: Domain) -> MerkleJob:
        """The same job with each stage's node recovered from its per-stage receipt signature."""
        stages = [(receipt_signer(domain, r.receipt, r.signature.signature), r.receipt) for r in job.receipts]
        return cls(job.authorization, job.signature, tuple(stages))

    def cost(self) -> int:
        return sum(r.amount for _, r in self.stages)


def node_leaves(jobs: Sequence[MerkleJob]) -> dict[str, list[Receipt]]:
    """Each node's receipts in batch order (nodes in order of first appearance): the leaves of
    the tree whose root the node signs."""
    out: dict[str, list[Receipt]] = {}
    for job in jobs:
        for node, receipt in job.stages:
            out.setdefault(Web3.to_checksum_address(node), []).append(receipt)
    return out


def batch_receipts(broker: str, batch_id: bytes, jobs: Sequence[MerkleJob]) -> dict[str, BatchReceipt]:
    """The :class:`BatchReceipt` each node of the batch must sign (node -> receipt)."""
    return {
        node: BatchReceipt(
            node,
            Web3.to_checksum_address(broker),
            batch_id,
            merkle_root([receipt_leaf(r) for r in receipts]),
            sum(r.amount for r in receipts),
            len(receipts),
        )
        for node, receipts in node_leaves(jobs).items()
    }


def sign_batch_receipt(key: bytes | str, domain: Domain, receipt: BatchReceipt) -> CompactSignature:
    return sign_typed(key, domain, "BatchReceipt", receipt.message())


def pack_stage(node_index: int, receipt: Receipt) -> int:
    """A stage's ``MerkleStage.packed`` word: node index, start, end, tokens, amount (see JobMarket.sol)."""
    r = receipt
    if r.amount >= 2**128 or node_index >= 2**32:
        raise PreflightError(
            f"a Merkle-settled stage bills below 2**128 token units and names one of fewer than 2**32 nodes; "
            f"got amount {r.amount}, node index {node_index}: settle this job with settle_batch"
        )
    return node_index << 224 | r.start << 192 | r.end << 160 | r.tokens << 128 | r.amount


def solo_batch_id(job_id: bytes) -> bytes:
    """``JobMarket.soloBatchId``: the batch id ``settleJob`` credits a job's stages under (nothing
    stored on chain); the broker ledger's id of a batch holding only this job (``batch_id_for``)."""
    return bytes(keccak(job_id))


def single_job_args(job: SignedJob) -> tuple[Any, ...]:
    """``settleJob``'s argument: the authorization as ``settleBatch`` takes it, each stage as
    (packed start/end/tokens/amount, output hash, its node's receipt signature r, vs)."""
    for i, s in enumerate(job.receipts):
        if s.receipt.amount >= 2**128:
            raise PreflightError(
                f"settleJob packs each stage's amount below 2**128 token units, but stage {i} bills "
                f"{s.receipt.amount}: settle this job with settle_batch (per-receipt)"
            )
    stages = [(pack_stage(0, s.receipt), s.receipt.output_hash, s.signature.r, s.signature.vs) for s in job.receipts]
    return (*job.as_tuple()[:7], stages)


def merkle_batch_args(
    jobs: Sequence[MerkleJob], signed: Mapping[str, SignedBatchReceipt]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(nodes, jobs) arguments of ``settleBatchMerkle``: nodes in order of first appearance."""
    order = list(node_leaves(jobs))
    missing = [n for n in order if n not in signed]
    if missing:
        raise PreflightError(
            f"no signed batch receipt from {len(missing)} node(s) of the batch ({', '.join(missing)}); "
            "settle their jobs with settle_batch (per-stage receipts) or ask those nodes to sign"
        )
    index = {n: i for i, n in enumerate(order)}
    job_tuples = []
    for job in jobs:
        a = job.authorization
        stages = [(pack_stage(index[Web3.to_checksum_address(n)], r), r.output_hash) for n, r in job.stages]
        sig = job.signature
        job_tuples.append((a.client, a.model_id, a.max_cost, a.nonce, a.deadline, sig.r, sig.vs, stages))
    return [signed[n].as_tuple() for n in order], job_tuples
