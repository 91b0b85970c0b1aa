"""The Merkle tree matches OpenZeppelin MerkleProof semantics (checked on chain in integration)."""

from __future__ import annotations

import random

import pytest
from eth_utils import keccak

from dlis_market.oracle.merkle import MerkleTree, hash_pair, leaf_hash, process_proof, verify


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(["uint256"], [i]) for i in range(n)]


def test_leaf_is_double_hash_of_abi_encoding() -> None:
    # abi.encode(uint256 7) is the 32-byte big-endian word
    assert leaf_hash(["uint256"], [7]) == keccak(keccak((7).to_bytes(32, "big")))


def test_pair_hash_is_commutative() -> None:
    a, b = _leaves(2)
    assert hash_pair(a, b) == hash_pair(b, a) == keccak(min(a, b) + max(a, b))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 33])
def test_every_leaf_proves_and_others_do_not(n: int) -> None:
    leaves = _leaves(n)
    tree = MerkleTree.build(leaves)
    for leaf in leaves:
        proof = tree.proof(leaf)
        assert verify(tree.root, leaf, proof)
        assert len(proof) <= max(1, (n - 1).bit_length())
    outsider = leaf_hash(["uint256"], [10_000])
    assert not verify(tree.root, outsider, tree.proof(leaves[0]))
    with pytest.raises(KeyError):
        tree.proof(outsider)


def test_root_does_not_depend_on_order() -> None:
    leaves = _leaves(11)
    shuffled = leaves[:]
    random.Random(3).shuffle(shuffled)
    assert MerkleTree.build(leaves).root == MerkleTree.build(shuffled).root


def test_tampered_proof_fails() -> None:
    leaves = _leaves(6)
    tree = MerkleTree.build(leaves)
    proof = tree.proof(leaves[2])
    proof[0] = bytes(32)
    assert process_proof(leaves[2], proof) != tree.root


def test_bad_input_refused() -> None:
    with pytest.raises(ValueError):
        MerkleTree.build([])
    with pytest.raises(ValueError):
        MerkleTree.build([b"short"])
    leaf = _leaves(1)[0]
    with pytest.raises(ValueError):
        MerkleTree.build([leaf, leaf])
