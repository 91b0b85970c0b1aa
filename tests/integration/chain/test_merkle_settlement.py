"""The Merkle settlement and payment-ticket bindings against the real JobMarket on Anvil.

What a broker and a node do with ``dlis_market.chain.job_market``: build each node's batch receipt,
have it signed, settle; a node's Merkle proof of one job; preflight refusals (a node that did not
sign, escrow short, a losing ticket) that send nothing; typed reverts for what only the chain knows.
"""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account

from dlis_market.chain import typed_data
from dlis_market.chain.errors import ContractRevertError, PreflightError
from dlis_market.chain.job_market import (
    JobAuthorization,
    MerkleJob,
    PaymentTicket,
    Receipt,
    SignedBatchReceipt,
    batch_receipts,
    merkle_proof,
    rand_commitment,
    receipt_leaf,
    sign_authorization,
    sign_batch_receipt,
    sign_payment_ticket,
    ticket_hash,
    ticket_wins,
    verify_merkle_proof,
    win_threshold,
)
from dlis_market.types import model_id
from tests.integration.conftest import DEV_PUBLISHER

UNIT = 10**18
MODEL = bytes.fromhex(model_id("smollm2-135m", DEV_PUBLISHER)[2:])
SPANS = [(0, 10), (10, 20), (20, 30)]


@pytest.fixture()
def setup(market):
    ops = [market.new_funded_account(1000 * UNIT) for _ in range(3)]
    nodes = [market.enroll_node(o) for o in ops]
    market.registry().publish_model(market.deployer, "smollm2-135m", "QmManifest", b"\x11" * 32, 30)
    client = market.new_funded_account(100 * UNIT)
    market.market().deposit(client, 10 * UNIT)
    return market, ops, nodes, client


def _job(market, client, nodes, nonce: int, amount: int = UNIT // 100) -> MerkleJob:
    jm = market.market()
    auth = JobAuthorization(client.address, market.broker.address, MODEL, UNIT, nonce, market.client.timestamp() + 600)
    stages = [
        (node.address, Receipt(auth.job_id, MODEL, s, e, 16, secrets.token_bytes(32), amount + i))
        for i, ((s, e), node) in enumerate(zip(SPANS, nodes, strict=True))
    ]
    return MerkleJob(auth, sign_authorization(client.key, jm.domain(), auth), tuple(stages))


def _signed(market, nodes, batch_id: bytes, jobs: list[MerkleJob]) -> dict[str, SignedBatchReceipt]:
    dom = market.market().domain()
    keys = {n.address: n.key for n in nodes}
    return {
        n: SignedBatchReceipt(b, sign_batch_receipt(keys[n], dom, b))
        for n, b in batch_receipts(market.broker.address, batch_id, jobs).items()
    }


def test_typehashes_match_solidity(market):
    fns = market.market().contract.functions
    assert bytes(fns.BATCH_RECEIPT_TYPEHASH().call()) == typed_data.type_hash("BatchReceipt")
    assert bytes(fns.PAYMENT_TICKET_TYPEHASH().call()) == typed_data.type_hash("PaymentTicket")


def test_merkle_batch_settles_exact_amounts_and_proves_each_job(setup):
    market, ops, nodes, client = setup
    jm = market.market()
    jobs = [_job(market, client, nodes, nonce) for nonce in (1, 2, 3)]
    bid = b"\x21" * 32
    signed = _signed(market, nodes, bid, jobs)
    escrow0 = jm.escrow_of(client.address)
    cost = sum(j.cost() for j in jobs)
    jm.settle_batch_merkle(market.broker, bid, jobs, signed)
    assert jm.escrow_of(client.address) == escrow0 - cost - jm.fee_for(cost)
    for i, op in enumerate(ops):
        assert jm.claimable_of(op.address) == 3 * (UNIT // 100 + i)
    assert all(jm.nonce_used(client.address, n) for n in (1, 2, 3))
    # a node shows one job's stage was under the root it signed (e.g. to an auditor)
    leaves = [receipt_leaf(r) for j in jobs for n, r in j.stages if n == nodes[1].address]
    root = signed[nodes[1].address].receipt.root
    assert all(verify_merkle_proof(leaf, merkle_proof(leaves, i), root) for i, leaf in enumerate(leaves))

    with pytest.raises(ContractRevertError) as err:
        jm.settle_batch_merkle(market.broker, b"\x22" * 32, jobs[:1], _signed(market, nodes, b"\x22" * 32, jobs[:1]))
    assert err.value.error == "JobMarketJobAlreadySettled"


def test_preflight_refuses_a_batch_a_node_did_not_sign_and_short_escrow(setup):
    market, _ops, nodes, client = setup
    jm = market.market()
    jobs = [_job(market, client, nodes, 5)]
    bid = b"\x23" * 32
    signed = _signed(market, nodes, bid, jobs)
    del signed[nodes[2].address]
    with pytest.raises(PreflightError, match="no signed batch receipt from 1 node"):
        jm.settle_batch_merkle(market.broker, bid, jobs, signed)
    big = [_job(market, client, nodes, 6, amount=5 * UNIT)]
    with pytest.raises(PreflightError, match="escrow"):
        jm.settle_batch_merkle(market.broker, bid, big, _signed(market, nodes, bid, big))


def test_chain_refusal_of_a_lying_node_is_a_typed_error(setup):
    market, _ops, nodes, client = setup
    jm = market.market()
    jobs = [_job(market, client, nodes, 7)]
    bid = b"\x24" * 32
    signed = _signed(market, nodes, bid, jobs)
    honest = signed[nodes[0].address].receipt
    from dataclasses import replace

    lying = replace(honest, total=honest.total + 1)
    signed[nodes[0].address] = SignedBatchReceipt(lying, sign_batch_receipt(nodes[0].key, jm.domain(), lying))
    with pytest.raises(ContractRevertError) as err:
        jm.settle_batch_merkle(market.broker, bid, jobs, signed)
    assert err.value.error == "JobMarketBatchTotalMismatch"
    assert err.value.error_args["nodeIndex"] == 0
    assert err.value.error_args["leavesTotal"] == honest.total
    assert not jm.nonce_used(client.address, 7)


def test_payment_ticket_redeems_once_and_losing_tickets_are_not_sent(setup):
    market, ops, nodes, client = setup
    jm = market.market()
    rand = secrets.randbits(256)
    deadline = market.client.timestamp() + 600

    def ticket(nonce: int, p: float) -> PaymentTicket:
        return PaymentTicket(
            client.address,
            market.broker.address,
            nodes[2].address,
            UNIT // 10,
            win_threshold(p),
            rand_commitment(rand),
            nonce,
            deadline,
        )

    t = ticket(1, 1.0)
    sig = sign_payment_ticket(client.key, jm.domain(), t)
    before = jm.claimable_of(ops[2].address)
    jm.redeem_winning_ticket(ops[2], t, sig, rand)
    assert jm.claimable_of(ops[2].address) == before + UNIT // 10
    assert jm.ticket_redeemed(ticket_hash(jm.domain(), t))
    with pytest.raises(ContractRevertError) as err:
        market.client.transact(ops[2], jm.contract.functions.redeemWinningTicket(t.as_tuple(), sig.r, sig.vs, rand))
    assert err.value.error == "JobMarketTicketAlreadyRedeemed"

    losing = next(
        (lt, s)
        for n in range(2, 200)
        for lt in [ticket(n, 0.05)]
        for s in [sign_payment_ticket(client.key, jm.domain(), lt)]
        if not ticket_wins(lt, s, rand)
    )
    sent = market.client.w3.eth.get_transaction_count(ops[2].address)
    with pytest.raises(PreflightError, match="does not win"):
        jm.redeem_winning_ticket(ops[2], losing[0], losing[1], rand)
    assert market.client.w3.eth.get_transaction_count(ops[2].address) == sent
    forged = sign_payment_ticket(Account.create().key, jm.domain(), ticket(300, 1.0))
    with pytest.raises(ContractRevertError) as err:
        jm.redeem_winning_ticket(ops[2], ticket(300, 1.0), forged, rand)
    assert err.value.error == "JobMarketInvalidTicketSignature"
