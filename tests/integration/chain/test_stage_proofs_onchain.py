"""Zero-knowledge proofs of a last stage checked and recorded on chain: a real EZKL (halo2) proof,
its verifier rendered by EZKL and compiled by the project's solcjs, deployed on the test's Anvil
next to the market, and every way of passing off a proof as another receipt's, another node's or
another model's refused with the contract's typed error and nothing recorded.

Cost (2 shared cores): one module fixture sets up a hidden-8 x vocab-16 head circuit for 2 tokens,
proves once, renders and compiles its verifier (~6 s together); each test deploys the verifier
(2.4M gas), publishes two 2-layer models and enrolls two nodes on a fresh snapshot.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pytest
from eth_account.signers.local import LocalAccount
from eth_utils import keccak

from dlis_market.chain import typed_data
from dlis_market.chain.errors import ContractRevertError
from dlis_market.chain.job_market import Receipt, SignedReceipt, sign_receipt
from dlis_market.chain.stage_proofs import (
    CircuitRegistration,
    CompiledVerifier,
    StageProofRegistry,
    compile_verifier,
    deploy_verifier,
    evm_calldata,
    render_verifier,
)
from dlis_market.chain.typed_data import sign_typed, typed_digest
from dlis_market.explorer.views import Explorer, tx_view
from dlis_market.oracle.zk_verify import felt_value
from dlis_market.protocol.zk_claims import BN254_R, claim_message, instances_hash, sign_stage_proof
from dlis_market.types import model_id, name_hash
from tests.integration.zk_helpers import VOCAB, ProvenHead, proven_head

TOKENS = 2
UNIT = 10**18


@dataclass(frozen=True)
class Circuit(ProvenHead):
    """The proven head with its verifier built and its VKA rendered."""

    verifier: CompiledVerifier
    vka: list[bytes]


@pytest.fixture(scope="module")
def head_circuit(tmp_path_factory: pytest.TempPathFactory) -> Circuit:
    cache = tmp_path_factory.mktemp("zk-onchain")
    head = proven_head(cache, TOKENS)
    c = head.circuit
    rendered = render_verifier(c.vk_path, c.settings_path, c.srs_path, cache / "verifier")
    return Circuit(c, head.key, head.proof, head.tokens, compile_verifier(rendered.sol), rendered.vka)


def output_hash(tokens: list[int]) -> bytes:
    return hashlib.sha256(np.asarray(tokens, dtype="<i8").tobytes()).digest()


@dataclass
class Onchain:
    market: object
    registry: StageProofRegistry
    domain: typed_data.Domain
    verifier: str
    node: LocalAccount  # a registered, staked node: the honest last stage
    rival: LocalAccount  # another registered node (of another operator)
    model: bytes  # the 2-layer model the circuit is registered for
    other_model: bytes  # another 2-layer model


def publish(market, name: str, layers: int) -> bytes:
    fn = market.registry().contract.functions.publishModel(name_hash(name), "QmHead", b"\x02" * 32, layers)
    market.client.transact(market.deployer, fn)
    return bytes.fromhex(model_id(name, market.deployer.address)[2:])


def registration(c: Circuit, verifier: str, model: bytes, **changes) -> CircuitRegistration:
    fields = {"vk_hash": c.key.vk_hash, "verifier": verifier, "vka": c.vka, "model_id": model, "vocab": VOCAB,
              "tolerance": int(0.1 * 2**c.key.output_scale), **changes}  # fmt: skip
    return CircuitRegistration(**fields)


@pytest.fixture()
def onchain(market, head_circuit: Circuit) -> Onchain:
    deployed = deploy_verifier(market.client, market.deployer, head_circuit.verifier)
    model, other = publish(market, "zk-head", 2), publish(market, "zk-other", 2)
    registry = market.stage_proofs()
    registry.register_circuit(market.oracle, registration(head_circuit, deployed["contractAddress"], model))
    node = market.enroll_node(market.new_funded_account(500 * UNIT))
    rival = market.enroll_node(market.new_funded_account(500 * UNIT))
    return Onchain(market, registry, market.market().domain(), deployed["contractAddress"], node, rival, model, other)


def receipt(
    o: Onchain, tokens: list[int], key: LocalAccount | None = None, job: bytes = b"\x07" * 32,
    model: bytes | None = None, start: int = 1, end: int = 2,
) -> SignedReceipt:  # fmt: skip
    r = Receipt(job_id=job, model_id=model or o.model, start=start, end=end, tokens=len(tokens),
                output_hash=output_hash(tokens), amount=10**15)  # fmt: skip
    return SignedReceipt(r, sign_receipt((key or o.node).key, o.domain, r))


def claim(
    o: Onchain, signed: SignedReceipt, instances: list[int], vk_hash: bytes, key: LocalAccount | None = None
) -> bytes:
    words = [i.to_bytes(32, "big") for i in instances]
    message = claim_message(o.domain, signed.receipt, instances_hash(words), vk_hash)
    return sign_typed((key or o.node).key, o.domain, "StageProof", message).signature


def refused(
    o: Onchain, c: Circuit, error: str, signed: SignedReceipt, vk_hash: bytes, proof: bytes, instances: list[int],
    sig: bytes, tokens: list[int], vka: list[bytes] | None = None,
) -> ContractRevertError:  # fmt: skip
    """The chain refuses the record with ``error`` and records nothing for ``signed``."""
    with pytest.raises(ContractRevertError) as err:
        o.registry.record(o.market.broker, signed, vk_hash, proof, instances, vka or c.vka, sig, tokens)
    assert err.value.error == error, err.value
    for node in (o.node, o.rival):
        assert o.registry.proof_of(o.domain, signed, node.address) is None  # nothing recorded
    return err.value


def test_the_chain_checks_and_records_an_honest_proof_once(onchain: Onchain, head_circuit: Circuit) -> None:
    o, c = onchain, head_circuit
    signed = receipt(o, c.tokens)
    proof, instances = evm_calldata(c.proof)
    # another registered node signs the same receipt fields and a claim, and records first: it gets
    # a record of its own, which neither names the node nor blocks its record
    rivals = receipt(o, c.tokens, key=o.rival)
    rival_claim = sign_stage_proof(o.rival.key, o.domain, rivals.receipt, c.proof, c.key.vk_hash)
    o.registry.record(o.market.broker, rivals, c.key.vk_hash, proof, instances, c.vka, rival_claim, c.tokens)
    assert o.registry.proof_of(o.domain, signed, o.node.address) is None
    sig = sign_stage_proof(o.node.key, o.domain, signed.receipt, c.proof, c.key.vk_hash)
    tx = o.registry.record_proof(o.market.broker, signed, c.key.vk_hash, c.proof, c.vka, sig, c.tokens)
    record = o.registry.proof_of(o.domain, signed, o.node.address)
    assert record is not None and record.node == o.node.address and record.block == tx["blockNumber"]
    assert record.vk_hash == c.key.vk_hash and record.input_commitment == instances[0]
    # the explorer decodes the record and the circuit's registration
    ex = Explorer(o.market.client)
    (event,) = tx_view(ex, "0x" + bytes(tx["transactionHash"]).hex()).events
    assert (event.contract, event.event) == ("StageProofRegistry", "StageProven")
    assert event.args["node"] == o.node.address and event.args["jobId"] == "0x" + signed.receipt.job_id.hex()
    assert {e.event for e in ex.market_logs() if e.contract == "StageProofRegistry"} >= {
        "CircuitRegistered", "StageProven"
    }  # fmt: skip
    # the contract's digest is the one nodes sign
    r = signed.receipt
    assert bytes(o.registry.contract.functions.receiptDigest(
        (r.job_id, r.model_id, r.start, r.end, r.tokens, r.output_hash, r.amount)).call()
    ) == typed_digest(o.domain, "Receipt", r.message())  # fmt: skip
    # replayed: refused, the record unchanged
    with pytest.raises(ContractRevertError) as err:
        o.registry.record(o.market.broker, signed, c.key.vk_hash, proof, instances, c.vka, sig, c.tokens)
    assert err.value.error == "StageProofRegistryAlreadyProven"
    assert o.registry.proof_of(o.domain, signed, o.node.address) == record


def test_a_tampered_proof_or_instance_is_refused_by_the_halo2_verifier(onchain: Onchain, head_circuit: Circuit):
    o, c = onchain, head_circuit
    signed = receipt(o, c.tokens)
    proof, instances = evm_calldata(c.proof)
    flipped = bytearray(proof)
    flipped[100] ^= 1
    sig = claim(o, signed, instances, c.key.vk_hash)
    refused(o, c, "StageProofRegistryProofRejected", signed, c.key.vk_hash, bytes(flipped), instances, sig, c.tokens)
    # the node signs a claim over other logits (one step lower on a losing entry, so the billed
    # tokens still win): the signatures hold, the proof does not prove these instances
    other = list(instances)
    loser = 1 + next(v for v in range(VOCAB) if v != c.tokens[0])
    other[loser] = (other[loser] - 1) % BN254_R
    sig = claim(o, signed, other, c.key.vk_hash)
    refused(o, c, "StageProofRegistryProofRejected", signed, c.key.vk_hash, proof, other, sig, c.tokens)
    # an instance outside the field (that a verifier might reduce): refused before it is read
    wide = list(instances)
    wide[loser] += BN254_R
    sig = claim(o, signed, wide, c.key.vk_hash)
    err = refused(o, c, "StageProofRegistryInstanceOutOfField", signed, c.key.vk_hash, proof, wide, sig, c.tokens)
    assert err.error_args["index"] == loser


def test_a_proof_moved_to_another_receipt_or_signer_is_refused(onchain: Onchain, head_circuit: Circuit) -> None:
    o, c = onchain, head_circuit
    proof, instances = evm_calldata(c.proof)
    signed = receipt(o, c.tokens)
    # an honest claim for another job's receipt, submitted with this receipt
    elsewhere = receipt(o, c.tokens, job=b"\x08" * 32)
    moved = sign_stage_proof(o.node.key, o.domain, elsewhere.receipt, c.proof, c.key.vk_hash)
    err = refused(o, c, "StageProofRegistryClaimNotBound", signed, c.key.vk_hash, proof, instances, moved, c.tokens)
    assert err.error_args["receiptSigner"].lower() == o.node.address.lower()
    # another node claims the node's receipt
    rival = claim(o, signed, instances, c.key.vk_hash, key=o.rival)
    refused(o, c, "StageProofRegistryClaimNotBound", signed, c.key.vk_hash, proof, instances, rival, c.tokens)
    # a key no operator staked for signs both the receipt and the claim
    stranger = o.market.new_funded_account(0)
    theirs = receipt(o, c.tokens, key=stranger)
    sig = claim(o, theirs, instances, c.key.vk_hash, key=stranger)
    refused(o, c, "StageProofRegistryNodeNotRoutable", theirs, c.key.vk_hash, proof, instances, sig, c.tokens)
    # the registered key's claim, with another circuit's VKA in calldata
    sig = claim(o, signed, instances, c.key.vk_hash)
    other_vka = [c.vka[0], bytes(32), *c.vka[2:]]
    refused(o, c, "StageProofRegistryWrongVka", signed, c.key.vk_hash, proof, instances, sig, c.tokens, other_vka)
    # a claim naming a circuit nobody registered
    unknown = b"\x99" * 32
    sig = claim(o, signed, instances, unknown)
    refused(o, c, "StageProofRegistryUnknownCircuit", signed, unknown, proof, instances, sig, c.tokens)


def test_tokens_the_proof_does_not_pick_are_refused(onchain: Onchain, head_circuit: Circuit) -> None:
    o, c = onchain, head_circuit
    proof, instances = evm_calldata(c.proof)
    logits = [felt_value(i.to_bytes(32, "big")) for i in instances[1:]]
    row = logits[:VOCAB]
    worst = int(np.argmin(row))
    assert max(row) - row[worst] > int(0.1 * 2**c.key.output_scale)  # well outside the tolerance
    cheap = [worst, *c.tokens[1:]]
    signed = receipt(o, cheap)  # the node signs a bill for a token its head did not pick
    sig = claim(o, signed, instances, c.key.vk_hash)
    err = refused(o, c, "StageProofRegistryTokenNotBest", signed, c.key.vk_hash, proof, instances, sig, cheap)
    assert err.error_args["index"] == 0 and err.error_args["tokenId"] == worst
    # the honest receipt, but other ids than its outputHash signs
    honest = receipt(o, c.tokens)
    sig = claim(o, honest, instances, c.key.vk_hash)
    refused(o, c, "StageProofRegistryOutputNotSigned", honest, c.key.vk_hash, proof, instances, sig, cheap)
    # fewer ids than the proof has rows
    short = receipt(o, c.tokens[:1])
    sig = claim(o, short, instances, c.key.vk_hash)
    refused(o, c, "StageProofRegistryInstanceCount", short, c.key.vk_hash, proof, instances, sig, c.tokens[:1])


def test_a_proof_of_one_models_head_backs_no_other_bill(onchain: Onchain, head_circuit: Circuit) -> None:
    o, c = onchain, head_circuit
    proof, instances = evm_calldata(c.proof)
    # a receipt billing another model, backed by this model's head circuit
    other = receipt(o, c.tokens, model=o.other_model)
    sig = claim(o, other, instances, c.key.vk_hash)
    refused(o, c, "StageProofRegistryCircuitModelMismatch", other, c.key.vk_hash, proof, instances, sig, c.tokens)
    # a receipt for the first layer of the model: a head proof says nothing of it
    first = receipt(o, c.tokens, start=0, end=1)
    sig = claim(o, first, instances, c.key.vk_hash)
    err = refused(o, c, "StageProofRegistryNotLastStage", first, c.key.vk_hash, proof, instances, sig, c.tokens)
    assert (err.error_args["end"], err.error_args["layers"]) == (1, 2)


def test_only_circuit_admins_register_circuits_and_never_replace_one(onchain: Onchain, head_circuit: Circuit) -> None:
    o, c = onchain, head_circuit
    registry = o.registry
    got = registry.circuit_of(c.key.vk_hash)
    assert got is not None and (got.verifier, got.vocab, got.model_id) == (o.verifier, VOCAB, o.model)
    assert got.tolerance == int(0.1 * 2**c.key.output_scale) and got.registrar == o.market.oracle.address
    assert got.vka_digest == keccak(b"".join(c.vka))
    stranger = o.market.new_funded_account(0)  # the oracle and the broker are admins (deployment)
    for who, circuit, error in (
        (stranger, registration(c, o.verifier, o.model, vk_hash=b"\x55" * 32), "AccessControlUnauthorizedAccount"),
        (o.market.oracle, registration(c, o.market.broker.address, o.model), "StageProofRegistryCircuitExists"),
        (o.market.oracle, registration(c, o.verifier, b"\x66" * 32, vk_hash=b"\x56" * 32),
         "StageProofRegistryUnknownModel"),
    ):  # fmt: skip
        with pytest.raises(ContractRevertError) as err:
            registry.register_circuit(who, circuit)
        assert err.value.error == error
    assert registry.circuit_of(c.key.vk_hash) == got
    assert registry.circuit_of(b"\x56" * 32) is None
    assert bytes(registry.contract.functions.STAGE_PROOF_TYPEHASH().call()) == typed_data.type_hash("StageProof")
    assert bytes(registry.contract.functions.RECEIPT_TYPEHASH().call()) == typed_data.type_hash("Receipt")


def test_the_verifier_compiles_with_the_projects_solcjs_within_eip170(head_circuit: Circuit) -> None:
    v = head_circuit.verifier
    assert 0 < v.runtime_size <= 24_576 and any(f.get("name") == "verifyProof" for f in v.abi)
    assert len(head_circuit.vka) > 100 and all(len(w) == 32 for w in head_circuit.vka)
