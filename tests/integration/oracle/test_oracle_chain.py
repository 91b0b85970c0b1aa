"""The oracle against a real Anvil: Merkle proofs verify on chain; slashing needs valid evidence."""

from __future__ import annotations

import pytest

from dlis_market.chain.errors import ContractRevertError
from dlis_market.oracle.epochs import build_record
from dlis_market.oracle.errors import EvidenceRefusedError
from dlis_market.oracle.merkle import MerkleTree, leaf_hash
from dlis_market.oracle.slashing import Slasher
from dlis_market.oracle.store import DB_FILE, OracleStore
from dlis_market.protocol.receipts import ReceiptWire
from dlis_market.protocol.spot_checks import SpotCheckEvidence
from dlis_market.protocol.telemetry import oracle_domain

# one copy of the evidence builder, shared with the unit tests (pytest runs as `python -m pytest` from the root)
from tests.unit.oracle.evidence_helpers import make_evidence, reference_output, signed_receipt

UNIT = 10**18


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_merkle_proofs_verify_against_posted_root(market, n: int) -> None:
    rep = market.reputation()
    leaves = [leaf_hash(["uint256"], [i]) for i in range(n)]
    tree = MerkleTree.build(leaves)
    nodes = ["0x" + f"{i + 1:040x}" for i in range(n)]
    rep.post_epoch(market.oracle, 5, [market.client.w3.to_checksum_address(a) for a in nodes], [1] * n, tree.root)
    assert rep.telemetry_root(5) == tree.root
    for leaf in leaves:
        assert rep.verify(5, leaf, tree.proof(leaf))
    # a leaf not in the tree, and a proof for another leaf, do not verify
    assert not rep.verify(5, leaf_hash(["uint256"], [999]), tree.proof(leaves[0]))
    if n > 1:
        assert not rep.verify(5, leaves[0], tree.proof(leaves[1]))


def test_epoch_record_proof_verifies_on_chain(market, tmp_path) -> None:
    rep = market.reputation()
    nodes = [market.new_funded_account(0).address for _ in range(5)]
    scores = {n: 1000 * (i + 1) for i, n in enumerate(nodes)}
    digests = {n: [bytes([i]) * 32, bytes([i + 100]) * 32] for i, n in enumerate(nodes)}
    record = build_record(9, scores, digests)
    rep.post_epoch(market.oracle, 9, list(scores), list(scores.values()), bytes.fromhex(record.root[2:]))
    for node in nodes:
        proof = record.proof(node)
        assert proof.verifies_offline()
        assert rep.verify(9, bytes.fromhex(proof.leaf_hash[2:]), proof.proof_bytes())
        assert rep.at(node, 9) == proof.leaf.score_bps
    # a tampered score does not verify
    forged = proof.leaf.model_copy(update={"score_bps": 10_000})
    assert not rep.verify(9, forged.hash(), proof.proof_bytes())


def _two_nodes(market):  # type: ignore[no-untyped-def]
    accused_op = market.new_funded_account(150 * UNIT)
    checker_op = market.new_funded_account(150 * UNIT)
    accused = market.enroll_node(accused_op, stake=150 * UNIT)
    checker = market.enroll_node(checker_op, stake=150 * UNIT)
    return accused_op, accused, checker_op, checker


def _oracle_domain(market):  # type: ignore[no-untyped-def]
    return oracle_domain(market.client.chain_id, market.reputation().address)


def _store(tmp_path) -> OracleStore:  # type: ignore[no-untyped-def]
    return OracleStore(f"sqlite:///{tmp_path / DB_FILE}")


def _slasher(market, tmp_path) -> Slasher:  # type: ignore[no-untyped-def]
    return Slasher(
        market.staking(),
        market.registry(),
        market.market().address,
        market.oracle,
        100 * UNIT,
        _store(tmp_path),
        _oracle_domain(market),
    )


def _evidence(market, accused, checker, domain, a, c, **kw):  # type: ignore[no-untyped-def]
    """Evidence assigned by the oracle account (the default trusted runner)."""
    return make_evidence(
        accused, checker, domain, a, c, runner=market.oracle, oracle_domain=_oracle_domain(market), **kw
    )


def test_mismatch_beyond_tolerance_slashes_and_unroutes(market, tmp_path) -> None:
    accused_op, accused, checker_op, checker = _two_nodes(market)
    staking, registry = market.staking(), market.registry()
    assert registry.get(accused.address).routable
    domain = market.market().domain()
    out = reference_output()
    evidence = _evidence(market, accused, checker, domain, out + 0.5, out)
    result = _slasher(market, tmp_path).submit(evidence, 0)
    assert result.operator == accused_op.address and result.reporter == checker_op.address
    assert result.slashed == 100 * UNIT
    assert staking.info(accused_op.address).active == 50 * UNIT  # below the 100 DLIS minimum
    assert not result.routable_after and not registry.get(accused.address).routable
    assert registry.get(checker.address).routable
    assert staking.claimable(checker_op.address) == 50 * UNIT  # reporter share 50 %
    kept = _store(tmp_path).slash_evidence(f"0x{result.evidence_hash.hex()}")  # anyone may audit it
    assert kept is not None and SpotCheckEvidence.model_validate_json(kept) == evidence
    # the same fault cannot be slashed twice, whoever reports it
    with pytest.raises(EvidenceRefusedError) as err:
        _slasher(market, tmp_path).submit(evidence, 0)
    assert err.value.reason == "already_slashed"


def test_no_slash_within_tolerance_or_with_bad_signatures(market, tmp_path) -> None:
    accused_op, accused, _, checker = _two_nodes(market)
    staking = market.staking()
    domain = market.market().domain()
    slasher = _slasher(market, tmp_path)
    out = reference_output()
    cases = {
        "within_tolerance": _evidence(market, accused, checker, domain, out + 1e-5, out),
        "bad_signature": _evidence(market, accused, checker, market.registry().domain(), out + 0.5, out),
    }
    outsider = market.new_funded_account(0)
    ev = _evidence(market, accused, checker, domain, out + 0.5, out)
    forged = ReceiptWire.from_signed(signed_receipt(outsider, domain, ev.accused_output.data))
    cases["bad_signature (outsider)"] = ev.model_copy(update={"accused_receipt": forged})
    cases["unregistered"] = _evidence(market, outsider, checker, domain, out + 0.5, out)
    for expected, evidence in cases.items():
        with pytest.raises(EvidenceRefusedError) as err:
            slasher.submit(evidence, 0)
        assert err.value.reason == expected.split(" ")[0], str(err.value)
    assert staking.info(accused_op.address).active == 150 * UNIT
    assert slasher.store.slash_count() == 0 and slasher.store.open_slashes() == []  # nothing recorded


def test_slash_requires_slasher_role(market, tmp_path) -> None:
    _, accused, _, checker = _two_nodes(market)
    out = reference_output()
    evidence = _evidence(market, accused, checker, market.market().domain(), out + 0.5, out)
    nobody = market.new_funded_account(0)
    # the evidence passes every check (the oracle account assigned it) but nobody lacks SLASHER_ROLE
    slasher = Slasher(
        market.staking(),
        market.registry(),
        market.market().address,
        nobody,
        UNIT,
        _store(tmp_path),
        _oracle_domain(market),
        runners=[market.oracle.address],
    )
    with pytest.raises(ContractRevertError) as err:
        slasher.submit(evidence, 0)
    assert err.value.error == "AccessControlUnauthorizedAccount"
    assert slasher.store.open_slashes() == [] and slasher.store.slash_count() == 0  # recorded as refused


def test_referee_required_two_of_three(market, tmp_path) -> None:
    accused_op, accused, _, checker = _two_nodes(market)
    referee = market.enroll_node(market.new_funded_account(150 * UNIT), stake=150 * UNIT)
    slasher = Slasher(
        market.staking(),
        market.registry(),
        market.market().address,
        market.oracle,
        100 * UNIT,
        _store(tmp_path),
        _oracle_domain(market),
        require_referee=True,
    )
    domain = market.market().domain()
    out = reference_output()
    with pytest.raises(EvidenceRefusedError) as err:
        slasher.submit(_evidence(market, accused, checker, domain, out + 0.5, out), 0)
    assert err.value.reason == "referee_required"
    with pytest.raises(EvidenceRefusedError) as err:
        slasher.submit(_evidence(market, accused, checker, domain, out + 0.5, out, referee=(referee, out + 0.5)), 0)
    assert err.value.reason == "checkers_disagree"
    assert market.staking().info(accused_op.address).active == 150 * UNIT
    result = slasher.submit(_evidence(market, accused, checker, domain, out + 0.5, out, referee=(referee, out)), 0)
    assert result.slashed == 100 * UNIT and not result.routable_after
