"""Merkle tree compatible with OpenZeppelin ``MerkleProof`` (sorted-pair keccak256).

Leaves follow OpenZeppelin's ``StandardMerkleTree`` convention: a leaf is
``keccak256(bytes.concat(keccak256(abi.encode(values...))))``; the double hash keeps a leaf from
ever equalling an inner node (second-preimage safety). Inner nodes hash the sorted pair
``keccak256(min(a, b) ++ max(a, b))``, which is what ``MerkleProof.verify`` recomputes, so a proof
is just the list of siblings from the leaf up. Leaves are sorted before building so the root does
not depend on the order telemetry arrived in; an odd node at a level is carried up unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eth_abi import encode
from eth_utils import keccak


def leaf_hash(types: Sequence[str], values: Sequence[object]) -> bytes:
    """``keccak256(bytes.concat(keccak256(abi.encode(values))))`` as in OZ StandardMerkleTree."""
    return bytes(keccak(keccak(encode(list(types), list(values)))))


def hash_pair(a: bytes, b: bytes) -> bytes:
    """OpenZeppelin ``Hashes.commutativeKeccak256``."""
    return bytes(keccak(a + b if a <= b else b + a))


def process_proof(leaf: bytes, proof: Sequence[bytes]) -> bytes:
    computed = leaf
    for sibling in proof:
        computed = hash_pair(computed, sibling)
    return computed


def verify(root: bytes, leaf: bytes, proof: Sequence[bytes]) -> bool:
    """What ``MerkleProof.verify(proof, root, leaf)`` returns, computed off chain."""
    return process_proof(leaf, proof) == root


@dataclass(frozen=True)
class MerkleTree:
    """All levels of the tree; ``levels[0]`` are the sorted leaves, ``levels[-1] == [root]``."""

    levels: tuple[tuple[bytes, ...], ...]

    @classmethod
    def build(cls, leaves: Sequence[bytes]) -> MerkleTree:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        if any(len(leaf) != 32 for leaf in leaves):
            raise ValueError("leaves must be 32-byte hashes")
        if len(set(leaves)) != len(leaves):
            raise ValueError("duplicate leaves: each leaf must be unique")
        level = tuple(sorted(leaves))
        levels = [level]
        while len(level) > 1:
            nxt = [hash_pair(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            if len(level) % 2:
                nxt.append(level[-1])
            level = tuple(nxt)
            levels.append(level)
        return cls(tuple(levels))

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    @property
    def leaves(self) -> tuple[bytes, ...]:
        return self.levels[0]

    def proof(self, leaf: bytes) -> list[bytes]:
        """Siblings from ``leaf`` to the root (empty for a one-leaf tree)."""
        try:
            index = self.leaves.index(leaf)
        except ValueError as exc:
            raise KeyError(f"leaf 0x{leaf.hex()} is not in this tree") from exc
        out: list[bytes] = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                out.append(level[sibling])
            index //= 2
        return out
