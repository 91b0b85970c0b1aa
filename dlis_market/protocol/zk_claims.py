"""How a node binds a zero-knowledge proof of a stage call to its receipt (prover and verifier side).

The node signs an EIP-712 ``StageProof(receiptDigest, instancesHash, vkHash)`` under the JobMarket
domain: the receipt's digest, ``keccak256`` of the proof's public instances as 32-byte big-endian
words in order, and ``keccak256`` of the verification key file. Here so that the worker that
signs (``node``) and the verifier that checks (``oracle/zk_verify.py``, the broker) share one
definition; what the bindings mean is explained in :mod:`dlis_market.oracle.zk_verify`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from eth_utils import keccak

from dlis_market.chain.job_market import Receipt
from dlis_market.chain.typed_data import Domain, sign_typed, typed_digest
from dlis_market.protocol.errors import ProofFormatError

# The BN254 scalar field: instances are its elements; those above R/2 stand for negative values.
BN254_R = 21888242871839275222246405745257275088548364400416034343698204186575808495617
# A proof of a 576-wide layer is ~200 KB; a logits row of a 49152 vocabulary adds ~3 MB of
# instances as JSON. Anything larger is refused before parsing.
MAX_PROOF_BYTES = 16 * 1024 * 1024


def proof_instances(proof: bytes) -> list[bytes]:
    """The proof's public instances, flattened in order, each as a 32-byte big-endian word."""
    if len(proof) > MAX_PROOF_BYTES:
        raise ProofFormatError(f"proof is {len(proof)} bytes, over the {MAX_PROOF_BYTES} accepted")
    try:
        columns = json.loads(proof)["instances"]
        words = [bytes.fromhex(str(felt))[::-1] for column in columns for felt in column]  # EZKL writes little endian
    except (ValueError, KeyError, TypeError) as exc:
        raise ProofFormatError(f"proof is not an EZKL proof JSON with instances ({exc})") from exc
    for i, word in enumerate(words):
        if len(word) != 32 or int.from_bytes(word, "big") >= BN254_R:
            raise ProofFormatError(f"instance {i} is not a BN254 field element (0x{word.hex()})")
    return words


def instances_hash(instances: list[bytes]) -> bytes:
    return bytes(keccak(b"".join(instances)))


def claim_message(domain: Domain, receipt: Receipt, instances_digest: bytes, vk_hash: bytes) -> dict[str, Any]:
    receipt_digest = typed_digest(domain, "Receipt", receipt.message())
    return {"receiptDigest": receipt_digest, "instancesHash": instances_digest, "vkHash": vk_hash}


def sign_stage_proof(private_key: bytes | str, domain: Domain, receipt: Receipt, proof: bytes, vk_hash: bytes) -> bytes:
    """The worker's 65-byte signature binding ``proof`` to its ``receipt``."""
    claim = claim_message(domain, receipt, instances_hash(proof_instances(proof)), vk_hash)
    return sign_typed(private_key, domain, "StageProof", claim).signature


@dataclass(frozen=True)
class ZkClaim:
    """What a last stage sends at close for a session that asked for a proof: the proof, its
    ``StageProof`` signature and every row its head read (float32 ``[T, H]``, what its fingerprint
    commits to); or why it could not prove (``error``)."""

    proof: bytes = b""
    signature: bytes = b""
    rows: bytes = b""
    prove_ms: int = 0
    error: str = ""

    @classmethod
    def from_wire(cls, answer: dict[str, Any]) -> ZkClaim:
        if "proof_error" in answer:
            return cls(error=str(answer["proof_error"])[:500])
        try:
            return cls(bytes(answer["proof"]), bytes(answer["proof_signature"]), bytes(answer["proof_rows"]),
                       int(answer.get("prove_ms", 0)))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            return cls(error=f"the last stage sent no proof ({exc!r} missing or malformed)")
