"""What an epoch commits to on chain, and the stored leaves that make its proofs.

Each node scored in an epoch has one Merkle leaf::

    leaf = keccak256(bytes.concat(keccak256(abi.encode(
        address node, uint64 epoch, uint16 scoreBps, uint32 reports, bytes32 telemetryDigest))))

where ``telemetryDigest = keccak256(d_1 ++ ... ++ d_n)`` over the EIP-712 digests of the node's
accepted reports in seq order. A node (or anyone holding its signed reports) can recompute the
digest, and with the proof from ``dlis oracle proof NODE EPOCH`` check on chain
(``ReputationOracle.verifyTelemetry``) that exactly those reports and that score were used.
The oracle keeps each posted epoch's record in its database (:mod:`store`).
"""

from __future__ import annotations

from collections.abc import Sequence

from eth_utils import keccak
from pydantic import Field
from web3 import Web3

from dlis_market.oracle.errors import ProofNotFoundError
from dlis_market.oracle.merkle import MerkleTree, leaf_hash, verify
from dlis_market.types import WireModel

LEAF_TYPES = ("address", "uint64", "uint16", "uint32", "bytes32")
Hex32 = Field(pattern=r"^0x[0-9a-fA-F]{64}$")


def telemetry_digest(report_digests: Sequence[bytes]) -> bytes:
    return bytes(keccak(b"".join(report_digests)))


class EpochLeaf(WireModel):
    node: str
    epoch: int = Field(ge=0, lt=2**64)
    score_bps: int = Field(ge=0, le=10_000)
    reports: int = Field(ge=0, lt=2**32)
    telemetry_digest: str = Hex32

    def hash(self) -> bytes:
        values = (
            Web3.to_checksum_address(self.node),
            self.epoch,
            self.score_bps,
            self.reports,
            bytes.fromhex(self.telemetry_digest[2:]),
        )
        return leaf_hash(LEAF_TYPES, values)


class EpochRecord(WireModel):
    epoch: int
    root: str = Hex32
    leaves: tuple[EpochLeaf, ...]
    report_digests: dict[str, tuple[str, ...]]  # node -> EIP-712 digests of its reports, seq order
    tx: str | None = None

    def tree(self) -> MerkleTree:
        return MerkleTree.build([leaf.hash() for leaf in self.leaves])

    def proof(self, node: str) -> Proof:
        """The inclusion proof of ``node``'s leaf (raises :class:`ProofNotFoundError` when unscored)."""
        node = Web3.to_checksum_address(node)
        leaf = next((x for x in self.leaves if x.node == node), None)
        if leaf is None:
            raise ProofNotFoundError(
                f"node {node} was not scored in epoch {self.epoch} ({len(self.leaves)} nodes were)"
            )
        h = leaf.hash()
        return Proof(
            node=node,
            epoch=self.epoch,
            leaf=leaf,
            leaf_hash="0x" + h.hex(),
            proof=tuple("0x" + p.hex() for p in self.tree().proof(h)),
            root=self.root,
            report_digests=self.report_digests.get(node, ()),
        )


class Proof(WireModel):
    node: str
    epoch: int
    leaf: EpochLeaf
    leaf_hash: str
    proof: tuple[str, ...]
    root: str
    report_digests: tuple[str, ...]

    def proof_bytes(self) -> list[bytes]:
        return [bytes.fromhex(p[2:]) for p in self.proof]

    def verifies_offline(self) -> bool:
        digest_ok = "0x" + telemetry_digest([bytes.fromhex(d[2:]) for d in self.report_digests]).hex()
        return digest_ok == self.leaf.telemetry_digest and verify(
            bytes.fromhex(self.root[2:]), self.leaf.hash(), self.proof_bytes()
        )


def build_record(epoch: int, scores: dict[str, int], digests: dict[str, list[bytes]]) -> EpochRecord:
    """The leaves and root of an epoch from its scores and each node's report digests."""
    leaves = tuple(
        EpochLeaf(
            node=Web3.to_checksum_address(node),
            epoch=epoch,
            score_bps=score,
            reports=len(digests.get(node, [])),
            telemetry_digest="0x" + telemetry_digest(digests.get(node, [])).hex(),
        )
        for node, score in sorted(scores.items())
    )
    root = MerkleTree.build([leaf.hash() for leaf in leaves]).root
    return EpochRecord(
        epoch=epoch,
        root="0x" + root.hex(),
        leaves=leaves,
        report_digests={n: tuple("0x" + d.hex() for d in ds) for n, ds in sorted(digests.items())},
    )
