"""A real halo2 proof (EZKL) of the final RMSNorm + LM head of a tiny random Llama, checked by the
oracle in this process, and the ways a worker could pass off a proof that does not prove its receipt.

Cost (2 shared cores): one session fixture sets up two circuits (hidden 8, vocab 16, 2^11 rows,
~1 s each plus a 0.7 s SRS) and proves once (~1.2 s); each verification is ~15 ms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from eth_account import Account
from transformers import LlamaConfig, LlamaForCausalLM

from dlis_market.chain.job_market import SignedReceipt, market_domain
from dlis_market.inference.zk_stage import (
    FinalHead,
    StageProof,
    ZkProveError,
    ZkStageCircuit,
    prepare_circuit,
    prove_stage,
)
from dlis_market.node.receipts import ReceiptLedger, sign
from dlis_market.oracle.zk_verify import (
    StageVerifyingKey,
    ZkProofRefusedError,
    input_commitment,
    sign_stage_proof,
    verify_stage_proof,
)

NODE = Account.from_key(b"\x11" * 32)
DOMAIN = market_domain(31337, "0x" + "ab" * 20)
MODEL_ID = b"\x42" * 32
HIDDEN, VOCAB = 8, 16


def tiny_head(seed: int) -> FinalHead:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=16,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # spread the logits so the argmax is clear of quantization steps
        model.lm_head.weight.normal_(0.0, 0.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
    return FinalHead.of(model)


@dataclass(frozen=True)
class Proved:
    head: FinalHead
    x: torch.Tensor
    circuit: ZkStageCircuit
    key: StageVerifyingKey
    other_key: StageVerifyingKey  # the same head shape with other weights
    proof: StageProof
    cache: Path


def key_of(circuit: ZkStageCircuit) -> StageVerifyingKey:
    return StageVerifyingKey(circuit.settings_path, circuit.vk_path, circuit.srs_path)


@pytest.fixture(scope="session")
def proved(tmp_path_factory: pytest.TempPathFactory) -> Proved:
    cache = tmp_path_factory.mktemp("zk-cache")
    head = tiny_head(seed=1)
    x = torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(7))
    circuit = prepare_circuit(head, x, cache, progress=False)
    other = prepare_circuit(tiny_head(seed=2), x, cache, progress=False)
    proof = prove_stage(circuit, x, progress=False)
    return Proved(head, x, circuit, key_of(circuit), key_of(other), proof, cache)


def receipt_for(token_ids: list[int], job: bytes = b"\x07" * 32) -> tuple[SignedReceipt, bytes]:
    """The worker's receipt for one last-stage call that sampled ``token_ids``, and its output bytes."""
    output = np.array(token_ids, dtype="<i8").tobytes()
    ledger = ReceiptLedger(job_id=job, model_id=MODEL_ID, start=1, end=2, price_per_token=10**12)
    ledger.record(len(token_ids), output)
    return sign(ledger, NODE.key, DOMAIN), output


def honest_token(p: Proved) -> int:
    with torch.no_grad():
        return int(p.head(p.x).argmax(-1).item())


def check(
    p: Proved,
    proof: bytes,
    signed: SignedReceipt,
    output: bytes,
    claim: bytes | None = None,
    key: StageVerifyingKey | None = None,
    commitment: bytes | None = None,
) -> np.ndarray:
    key = key or p.key
    claim = claim if claim is not None else sign_stage_proof(NODE.key, DOMAIN, signed.receipt, proof, key.vk_hash)
    verified = verify_stage_proof(
        proof=proof,
        claim_signature=claim,
        signed_receipt=signed,
        node=NODE.address,
        domain=DOMAIN,
        key=key,
        expected_input_commitment=commitment or input_commitment(p.x.numpy(), key.input_scale),
        output=output,
    )
    return verified.outputs


def tampered_output(proof: bytes, index: int = 1) -> bytes:
    """The proof with public output ``index - 1`` raised by one quantization step."""
    doc = json.loads(proof)
    value = int.from_bytes(bytes.fromhex(doc["instances"][0][index]), "little") + 1
    doc["instances"][0][index] = value.to_bytes(32, "little").hex()
    return json.dumps(doc).encode()


def test_honest_proof_verifies_and_its_logits_are_the_heads(proved: Proved) -> None:
    signed, output = receipt_for([honest_token(proved)])
    logits = check(proved, proved.proof.proof, signed, output)
    with torch.no_grad():
        expected = proved.head(proved.x).numpy()
    assert logits.shape == expected.shape == (1, 1, VOCAB)
    assert np.abs(logits - expected).max() < 0.1  # fixed point at scale 2^7


def test_setup_is_cached_per_stage(proved: Proved) -> None:
    keys_made = proved.circuit.pk_path.stat().st_mtime_ns
    again = prepare_circuit(proved.head, proved.x, proved.cache, progress=False)
    assert again.key == proved.circuit.key
    assert again.pk_path.stat().st_mtime_ns == keys_made  # not set up a second time
    circuits = sorted(p.name for p in proved.cache.iterdir() if (p / "pk.key").exists())
    assert circuits == sorted([proved.circuit.key, proved.other_key.vk_path.parent.name])  # one per weights


def test_tampered_public_output_is_refused_even_when_the_node_signs_it(proved: Proved) -> None:
    signed, output = receipt_for([honest_token(proved)])
    forged = tampered_output(proved.proof.proof)
    with pytest.raises(ZkProofRefusedError) as refused:  # claim over the honest instances
        check(
            proved,
            forged,
            signed,
            output,
            claim=sign_stage_proof(NODE.key, DOMAIN, signed.receipt, proved.proof.proof, proved.key.vk_hash),
        )
    assert refused.value.reason == "not_bound"
    with pytest.raises(ZkProofRefusedError) as refused:  # the node signs the altered instances itself
        check(proved, forged, signed, output)
    assert refused.value.reason == "proof_invalid"


def test_proof_bound_to_another_receipt_is_refused(proved: Proved) -> None:
    token = honest_token(proved)
    first, _ = receipt_for([token], job=b"\x01" * 32)
    second, output = receipt_for([token], job=b"\x02" * 32)
    claim_for_first = sign_stage_proof(NODE.key, DOMAIN, first.receipt, proved.proof.proof, proved.key.vk_hash)
    with pytest.raises(ZkProofRefusedError) as refused:
        check(proved, proved.proof.proof, second, output, claim=claim_for_first)
    assert refused.value.reason == "not_bound"


def test_proof_over_other_activations_is_refused(proved: Proved) -> None:
    signed, output = receipt_for([honest_token(proved)])
    other_input = input_commitment(proved.x.numpy() + 0.25, proved.key.input_scale)
    with pytest.raises(ZkProofRefusedError) as refused:
        check(proved, proved.proof.proof, signed, output, commitment=other_input)
    assert refused.value.reason == "wrong_input"


def test_receipt_signing_another_token_than_the_proven_logits_is_refused(proved: Proved) -> None:
    with torch.no_grad():
        worst = int(proved.head(proved.x).argmin(-1).item())
    signed, output = receipt_for([worst])
    with pytest.raises(ZkProofRefusedError) as refused:
        check(proved, proved.proof.proof, signed, output)
    assert refused.value.reason == "output_mismatch"


def test_wrong_verification_key_is_refused(proved: Proved) -> None:
    signed, output = receipt_for([honest_token(proved)])
    assert proved.other_key.vk_hash != proved.key.vk_hash
    with pytest.raises(ZkProofRefusedError) as refused:  # claim names the prover's key, oracle holds another
        check(
            proved,
            proved.proof.proof,
            signed,
            output,
            key=proved.other_key,
            claim=sign_stage_proof(NODE.key, DOMAIN, signed.receipt, proved.proof.proof, proved.key.vk_hash),
        )
    assert refused.value.reason == "not_bound"
    with pytest.raises(ZkProofRefusedError) as refused:  # claim names the other key: halo2 itself refuses
        check(proved, proved.proof.proof, signed, output, key=proved.other_key)
    assert refused.value.reason == "proof_invalid"


def test_input_of_another_shape_is_a_typed_error(proved: Proved) -> None:
    with pytest.raises(ZkProveError, match=r"shape \[1, 1, 8\]"):
        prove_stage(proved.circuit, torch.zeros(1, 2, HIDDEN), progress=False)


def test_malformed_and_truncated_proofs_are_refused(proved: Proved) -> None:
    signed, output = receipt_for([honest_token(proved)])
    with pytest.raises(ZkProofRefusedError) as refused:
        check(proved, b"{not json", signed, output, claim=b"\x00" * 65)
    assert refused.value.reason == "malformed"
    doc = json.loads(proved.proof.proof)
    doc["proof"], doc["hex_proof"] = doc["proof"][:64], doc["hex_proof"][:130]
    with pytest.raises(ZkProofRefusedError) as refused:  # signed by the node, instances intact, proof cut
        check(proved, json.dumps(doc).encode(), signed, output)
    assert refused.value.reason == "proof_invalid"
