"""protocol.pricing against its reference, JobMarket on a real Anvil.

The broker's quote, the scheduler's route choice, the driver's failover budget and the receipts all
price with ``dlis_market.protocol.pricing``; here the contract settles jobs at the edges of those
functions: a job that costs exactly ``cost_budget(max_cost)`` settles and is charged
``route_bound(...).total``; one token unit more reverts ``JobMarketCostExceedsAuthorization``.
"""

from __future__ import annotations

import secrets

import pytest

from dlis_market.chain.errors import ContractRevertError
from dlis_market.chain.job_market import (
    JobAuthorization,
    Receipt,
    SignedJob,
    SignedReceipt,
    sign_authorization,
    sign_receipt,
)
from dlis_market.protocol.pricing import cost_budget, fee_on, route_bound, stage_charge

UNIT = 10**18
SPANS = ((0, 10), (10, 20), (20, 30))


@pytest.fixture()
def three_nodes(market):
    ops = [market.new_funded_account(1000 * UNIT) for _ in SPANS]
    nodes = [market.enroll_node(o) for o in ops]
    model = market.registry().publish_model(market.deployer, "priced-model", "QmManifest", b"\x11" * 32, 30)
    client = market.new_funded_account(100 * UNIT)
    market.market().deposit(client, 50 * UNIT)
    return market, nodes, model, client


def _job(market, nodes, model, client, max_cost: int, prices: tuple[int, ...], tokens: int) -> SignedJob:
    jm = market.market()
    dom = jm.domain()
    auth = JobAuthorization(
        client.address, market.broker.address, model, max_cost, secrets.randbits(64), market.client.timestamp() + 600
    )
    receipts = []
    for (start, end), node, price in zip(SPANS, nodes, prices, strict=True):
        r = Receipt(auth.job_id, model, start, end, tokens, secrets.token_bytes(32), stage_charge(price, tokens))
        receipts.append(SignedReceipt(r, sign_receipt(node.key, dom, r)))
    return SignedJob(auth, sign_authorization(client.key, dom, auth), tuple(receipts))


@pytest.mark.parametrize("max_cost", [10**6 + 7, 123_456_789_012_345, 3 * UNIT + 1])
def test_a_route_at_the_cost_budget_settles_and_one_unit_more_reverts(three_nodes, max_cost: int) -> None:
    market, nodes, model, client = three_nodes
    jm = market.market()
    fee_bps = jm.fee_bps()
    assert fee_bps > 0
    tokens = 7
    budget = cost_budget(max_cost, fee_bps)
    # prices that make the route cost exactly the budget (the last stage takes the remainder)
    per = budget // tokens // 3
    prices = (per, per, (budget - 2 * per * tokens) // tokens)
    bound = route_bound(prices, tokens, fee_bps)
    assert bound.total <= max_cost and bound.fee == fee_on(bound.cost, fee_bps)
    over = _job(market, nodes, model, client, bound.total - 1, prices, tokens)  # authorizes one unit less
    with pytest.raises(ContractRevertError) as err:
        jm.settle_batch(market.broker, secrets.token_bytes(32), [over])
    assert err.value.error == "JobMarketCostExceedsAuthorization"
    assert err.value.error_args["total"] == bound.total
    escrow = jm.escrow_of(client.address)
    jm.settle_batch(
        market.broker, secrets.token_bytes(32), [_job(market, nodes, model, client, max_cost, prices, tokens)]
    )
    assert escrow - jm.escrow_of(client.address) == bound.total


def test_cost_budget_is_the_largest_cost_that_fits() -> None:
    for fee_bps in (0, 1, 250, 2000):
        for total in (0, 1, 2, 99, 10_001, 10**18 + 3, 2**200 + 5):
            c = cost_budget(total, fee_bps)
            assert c + fee_on(c, fee_bps) <= total
            assert c + 1 + fee_on(c + 1, fee_bps) > total
