"""Attacker: a node operator who, after its node served a job, leaves routing before the broker
settles (unstakes below the minimum, or deregisters the node) so that the whole job, and with it
the other stages' pay, fails to settle.

Real Anvil with the real contracts, through the Python bindings. The job is settled anyway: the
leaving stage's receipt is forfeited (a ``ReceiptForfeited`` event, evidence against that node),
the honest stages are paid exactly their receipts, and the client pays only those plus the fee.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import pytest
from eth_account.signers.local import LocalAccount

from dlis_market.chain.devnet import LocalMarket
from dlis_market.chain.job_market import (
    ForfeitedReceipt,
    JobAuthorization,
    Receipt,
    SignedJob,
    SignedReceipt,
    sign_authorization,
    sign_receipt,
)
from dlis_market.types import model_id
from tests.integration.conftest import DEV_PUBLISHER

UNIT = 10**18
LAYERS = 30
SPANS = ((0, 10), (10, 20), (20, 30))
AMOUNTS = (3 * UNIT, 2 * UNIT, 5 * UNIT)
MODEL = bytes.fromhex(model_id("smollm2-135m", DEV_PUBLISHER)[2:])


@dataclass
class Served:
    operators: list[LocalAccount]
    nodes: list[LocalAccount]
    client: LocalAccount
    job: SignedJob


def _serve(market: LocalMarket) -> Served:
    """Three operators each run one node; the nodes serve one job and sign their receipts."""
    market.registry().publish_model(market.deployer, "smollm2-135m", "QmManifest", b"\x11" * 32, LAYERS)
    operators = [market.new_funded_account(1_000 * UNIT) for _ in SPANS]
    nodes = [market.enroll_node(op) for op in operators]
    client = market.new_funded_account(1_000 * UNIT)
    jm = market.market()
    jm.deposit(client, 100 * UNIT)
    dom = jm.domain()
    auth = JobAuthorization(client.address, market.broker.address, MODEL, 20 * UNIT, 1, market.client.timestamp() + 600)
    receipts = []
    for (start, end), amount, node in zip(SPANS, AMOUNTS, nodes, strict=True):
        rc = Receipt(auth.job_id, MODEL, start, end, 16, secrets.token_bytes(32), amount)
        receipts.append(SignedReceipt(rc, sign_receipt(node.key, dom, rc)))
    job = SignedJob(auth, sign_authorization(client.key, dom, auth), tuple(receipts))
    return Served(operators, nodes, client, job)


def _settle_and_check(market: LocalMarket, s: Served, bad: int) -> None:
    jm = market.market()
    treasury = market.deployment_treasury()
    escrow_before = jm.escrow_of(s.client.address)
    claimable_before = [jm.claimable_of(op.address) for op in s.operators]
    treasury_before = jm.claimable_of(treasury)

    receipt = jm.settle_batch(market.broker, secrets.token_bytes(32), [s.job])

    honest = sum(a for i, a in enumerate(AMOUNTS) if i != bad)
    fee = jm.fee_for(honest)
    assert jm.forfeited_receipts(receipt) == [
        ForfeitedReceipt(s.job.authorization.job_id, s.nodes[bad].address, AMOUNTS[bad])
    ]
    assert jm.escrow_of(s.client.address) == escrow_before - honest - fee
    assert jm.claimable_of(treasury) == treasury_before + fee
    for i, op in enumerate(s.operators):
        want = 0 if i == bad else AMOUNTS[i]
        assert jm.claimable_of(op.address) == claimable_before[i] + want, f"operator {i}"
    assert jm.nonce_used(s.client.address, 1)


@pytest.mark.parametrize("bad", [0, 1, 2])
def test_unstake_below_minimum_after_serving_forfeits_only_that_receipt(market: LocalMarket, bad: int) -> None:
    s = _serve(market)
    # the attack: right after serving, the operator drops below the minimum stake
    market.staking().request_unstake(s.operators[bad], 1)
    assert not market.registry().get(s.nodes[bad].address).routable  # type: ignore[union-attr]
    _settle_and_check(market, s, bad)


def test_deregister_after_serving_forfeits_only_that_receipt(market: LocalMarket) -> None:
    s = _serve(market)
    market.registry().deregister(s.operators[1], s.nodes[1].address)
    _settle_and_check(market, s, 1)
