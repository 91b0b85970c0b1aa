"""Checking a worker's zero-knowledge proof of one stage call (EZKL 23, halo2 over KZG/BN254).

A proof alone says "some input with this Poseidon commitment, run through the circuit of this
verification key, gives these logits". It becomes evidence about a *receipt* only through three
bindings, all checked here:

1. **Signer.** The node signs an EIP-712 ``StageProof(receiptDigest, instancesHash, vkHash)``
   (``chain/typed_data.py``, JobMarket domain) with the key that signed the receipt:
   ``receiptDigest`` is the receipt's EIP-712 digest (job, model, layers, tokens, outputHash,
   amount, chain, JobMarket), ``instancesHash`` is ``keccak256`` of the proof's public instances as
   32-byte big-endian words in order (``keccak256(abi.encodePacked(uint256[] instances))`` on
   chain, what the EVM verifier takes), ``vkHash`` is ``keccak256`` of the verification key file.
   A proof re-used for another receipt, another key or with other instances fails here.
2. **Input.** Instance 0 is the Poseidon hash of the quantized input activations (input visibility
   ``hashed``); it must equal the commitment the oracle computes (:func:`input_commitment`) from
   the rows the previous stage output, which that stage's own receipt signs.
3. **Output.** The remaining instances are the circuit's outputs (visibility ``public``); given the
   bytes whose sha256 is the receipt's ``outputHash`` (sampled ids at the last stage, float32
   rows elsewhere), they must agree: the argmax of each proven logits row (up to ``tolerance``)
   is the sampled id, or each float is within ``tolerance`` of the proven value.

Why ``hashed`` in and ``public`` out: one 32-byte commitment stands for any number of input
activations (hidden states of a prompt can be inverted to the prompt, and each public value is
32 bytes of calldata and an MSM term on chain), while the outputs must be readable to be compared
with what the receipt signs. The SRS and the keys must come from the oracle's side (or a
ceremony), never from the prover: whoever knows the SRS trapdoor forges proofs.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import ezkl
import numpy as np
from eth_keys.exceptions import BadSignature
from eth_keys.exceptions import ValidationError as KeyValidationError
from eth_utils import keccak

from dlis_market.chain.job_market import Receipt, SignedReceipt, receipt_signer
from dlis_market.chain.typed_data import Domain, recover_typed
from dlis_market.errors import OracleError
from dlis_market.protocol.errors import ProofFormatError
from dlis_market.protocol.zk_claims import (  # noqa: F401  (re-exported: the verifier's API)
    BN254_R,
    MAX_PROOF_BYTES,
    claim_message,
    instances_hash,
    proof_instances,
    sign_stage_proof,
)

# How far a receipt's output may sit from the proven one, in the output's own units: for token ids,
# how far below its row's best logit the billed token's proven logit may be (quantization error).
OUTPUT_TOLERANCE = 0.1


class ZkProofRefusedError(OracleError):
    """A stage proof does not prove what its receipt claims. ``reason`` is one word for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class StageVerifyingKey:
    """The files the oracle verifies one stage's proofs with: settings, verification key, SRS.

    Registered per (model, layer range) by the oracle; ``vk_hash`` is what claims must name."""

    settings_path: Path
    vk_path: Path
    srs_path: Path

    @cached_property
    def vk_hash(self) -> bytes:
        return bytes(keccak(self.vk_path.read_bytes()))

    @cached_property
    def settings(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.settings_path.read_text())
        return loaded

    @property
    def input_scale(self) -> int:
        return int(self.settings["model_input_scales"][0])

    @property
    def output_scale(self) -> int:
        return int(self.settings["model_output_scales"][0])

    @property
    def output_tolerance(self) -> int:
        """:data:`OUTPUT_TOLERANCE` in the circuit's output fixed point (what the chain compares)."""
        return int(OUTPUT_TOLERANCE * 2**self.output_scale)

    @property
    def output_shape(self) -> list[int]:
        return [int(d) for d in self.settings["model_instance_shapes"][0]]

    def check_visibility(self) -> None:
        """Refuse a key whose circuit does not commit its input and publish its output."""
        args = self.settings["run_args"]
        if not isinstance(args["input_visibility"], dict) or "Hashed" not in args["input_visibility"]:
            raise ZkProofRefusedError(
                "bad_key",
                f"the circuit of {self.settings_path} has input visibility {args['input_visibility']!r}; "
                "stage proofs must commit the input as a Poseidon hash: set it up with input visibility 'hashed'",
            )
        if args["output_visibility"] != "Public":
            raise ZkProofRefusedError(
                "bad_key",
                f"the circuit of {self.settings_path} has output visibility {args['output_visibility']!r}; "
                "stage proofs must publish their outputs: set it up with output visibility 'public'",
            )


def felt_value(word: bytes) -> int:
    """A field element as the signed integer it encodes."""
    v = int.from_bytes(word, "big")
    return v - BN254_R if v > BN254_R // 2 else v


def input_commitment(rows: np.ndarray, input_scale: int) -> bytes:
    """Poseidon hash of ``rows`` quantized as the circuit quantizes its input: instance 0 of an
    honest proof over exactly these activations."""
    felts = [ezkl.float_to_felt(float(v), input_scale, ezkl.PyInputType.F32) for v in np.ravel(rows)]
    (digest,) = ezkl.poseidon_hash(felts)
    return bytes.fromhex(digest)[::-1]


@dataclass(frozen=True)
class VerifiedStageProof:
    input_commitment: bytes
    outputs: np.ndarray  # dequantized circuit outputs, in the circuit's output shape
    instances_hash: bytes
    verify_s: float  # the halo2 verification alone


def _signer(domain: Domain, claim: dict[str, Any], signature: bytes) -> str:
    try:
        return recover_typed(domain, "StageProof", claim, signature)
    except (ValueError, TypeError) as exc:
        raise ZkProofRefusedError("bad_signature", f"the proof claim's signature does not recover: {exc}") from exc


def _halo2_verify(proof: bytes, key: StageVerifyingKey) -> float:
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dlis-zk-verify-") as tmp:
        path = Path(tmp) / "proof.json"
        path.write_bytes(proof)
        try:
            ok = ezkl.verify(str(path), str(key.settings_path), str(key.vk_path), str(key.srs_path), False)
        except RuntimeError as exc:  # EZKL raises when the proof does not check (or does not parse)
            raise ZkProofRefusedError("proof_invalid", f"the halo2 verifier refused the proof: {exc}") from exc
    if not ok:
        raise ZkProofRefusedError("proof_invalid", "the halo2 verifier returned false for the proof")
    return time.perf_counter() - began


def _check_output(
    outputs: np.ndarray, output: bytes, dtype: Literal["int64", "float32"], tolerance: float, receipt: Receipt
) -> None:
    if hashlib.sha256(output).digest() != receipt.output_hash:
        raise ZkProofRefusedError(
            "output_not_signed",
            f"sha256 of the given output is 0x{hashlib.sha256(output).hexdigest()} but the receipt signs "
            f"0x{receipt.output_hash.hex()}; send the exact bytes the node output",
        )
    rows = outputs.reshape(-1, outputs.shape[-1])
    if dtype == "int64":
        ids = np.frombuffer(output, dtype="<i8") if len(output) % 8 == 0 else np.empty(0, dtype=np.int64)
        if ids.size != rows.shape[0] or ids.min(initial=0) < 0 or ids.max(initial=0) >= rows.shape[1]:
            raise ZkProofRefusedError(
                "output_mismatch",
                f"the receipt's output holds {len(output)} bytes; the proof has {rows.shape[0]} logits rows of "
                f"{rows.shape[1]}: expected one int64 token id below {rows.shape[1]} per row",
            )
        gaps = rows.max(axis=1) - rows[np.arange(rows.shape[0]), ids]
        if gaps.max() > tolerance:
            t = int(gaps.argmax())
            raise ZkProofRefusedError(
                "output_mismatch",
                f"token {t}: the receipt's id {int(ids[t])} scores {gaps[t]:.4g} below the proven best logit "
                f"(id {int(rows[t].argmax())}), over the {tolerance:.4g} allowed for quantization",
            )
        return
    values = np.frombuffer(output, dtype="<f4") if len(output) % 4 == 0 else np.empty(0, dtype=np.float32)
    if values.size != outputs.size:
        raise ZkProofRefusedError(
            "output_mismatch", f"the receipt's output holds {values.size} float32 values, the proof {outputs.size}"
        )
    worst = float(np.abs(values.astype(np.float64) - outputs.ravel()).max())
    if worst > tolerance:
        raise ZkProofRefusedError(
            "output_mismatch",
            f"the receipt's output differs from the proven output by up to {worst:.4g}, over the {tolerance:.4g} "
            "allowed for quantization",
        )


def verify_stage_proof(
    *,
    proof: bytes,
    claim_signature: bytes,
    signed_receipt: SignedReceipt,
    node: str,
    domain: Domain,
    key: StageVerifyingKey,
    expected_input_commitment: bytes,
    output: bytes | None = None,
    output_dtype: Literal["int64", "float32"] = "int64",
    tolerance: float = OUTPUT_TOLERANCE,
) -> VerifiedStageProof:
    """Accept ``proof`` as ``node``'s proof of the stage call its receipt signs, or raise
    :class:`ZkProofRefusedError` naming the first binding that fails (cheap checks first; the
    halo2 verification runs in this process). ``output``: the bytes the receipt's outputHash is
    sha256 of; without them the output binding (3. in the module doc) is not checked."""
    key.check_visibility()
    try:
        instances = proof_instances(proof)
    except ProofFormatError as exc:
        raise ZkProofRefusedError("malformed", str(exc)) from exc
    n_out = int(np.prod(key.output_shape))
    if len(instances) != 1 + n_out:
        raise ZkProofRefusedError(
            "malformed", f"proof has {len(instances)} instances; the key's circuit has 1 input commitment + {n_out}"
        )
    receipt = signed_receipt.receipt
    try:
        receipt_by = receipt_signer(domain, receipt, signed_receipt.signature.signature)
    except (ValueError, TypeError, BadSignature, KeyValidationError) as exc:
        raise ZkProofRefusedError("bad_signature", f"the receipt's signature does not recover: {exc}") from exc
    if receipt_by.lower() != node.lower():
        raise ZkProofRefusedError("bad_signature", f"the receipt is signed by {receipt_by}, not by {node}")
    digest = instances_hash(instances)
    claim_by = _signer(domain, claim_message(domain, receipt, digest, key.vk_hash), claim_signature)
    if claim_by.lower() != node.lower():
        raise ZkProofRefusedError(
            "not_bound",
            f"the proof claim recovers {claim_by}, not {node}: it was signed for another receipt, other instances "
            f"or another verification key than 0x{key.vk_hash.hex()[:16]}.. (layers [{receipt.start}, {receipt.end}))",
        )
    if instances[0] != expected_input_commitment:
        raise ZkProofRefusedError(
            "wrong_input",
            f"the proof commits input 0x{instances[0].hex()}, not 0x{expected_input_commitment.hex()} (the "
            "previous stage's signed output): it proves a computation on other activations",
        )
    verify_s = _halo2_verify(proof, key)
    scale = 2.0**key.output_scale
    outputs = np.array([felt_value(w) / scale for w in instances[1:]]).reshape(key.output_shape)
    if output is not None:
        _check_output(outputs, output, output_dtype, tolerance, receipt)
    return VerifiedStageProof(instances[0], outputs, digest, verify_s)
