"""JobMarket.settleJob: one job settled alone, the cheapest single-job path.

It must move exactly the money a batch of one moves through ``settleBatch`` (escrow debit,
operator credits, treasury fee), keep every per-job check with the same named errors (job index
0), refuse replays across paths, and be refused to everyone but a broker. Also the fee accounting
that settlement shares (fees credited to the current treasury in the totals slot), and the
registry's and staking's one-call lookups settlement uses.
"""

import pytest
from conftest import (
    FEE_BPS,
    MAX_AUTH_LIFETIME,
    MIN_STAKE,
    MODEL_ID,
    MODEL_LAYERS,
    NODES,
    UNIT,
    ZERO,
    deposit,
    future,
    key_of,
    make_job,
    past,
    register,
    reverts,
    settle,
    settle_solo,
    settlement_state,
    solo,
    stake,
    two_stage,
)
from conftest import three_stage as conftest_three_stage
from eth_utils import keccak

from dlis_market.broker.ledger import batch_id_for
from dlis_market.chain.typed_data import job_id

pytestmark = pytest.mark.usefixtures("live")
A, B = 3 * UNIT, 2 * UNIT
COST = A + B
FEE = COST * FEE_BPS // 10_000


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    pass


def three_stage(market, client, broker, nonce: int, **kw):
    return conftest_three_stage(market, client, broker, nonce, (A, B, UNIT), **kw)


def state(market, token, roles) -> list:
    return settlement_state(market, token, roles)


def delta(before: list, after: list) -> list:
    return [b - a for a, b in zip(before, after, strict=True)]


def test_settle_job_moves_exactly_what_a_batch_of_one_moves(market, token, roles):
    c1, broker = roles["client1"], roles["broker"]
    s0 = state(market, token, roles)
    settle(market, broker, "one", [three_stage(market, c1, broker, 1)])
    s1 = state(market, token, roles)
    settle_solo(market, broker, three_stage(market, c1, broker, 2))
    s2 = state(market, token, roles)
    assert delta(s0, s1) == delta(s1, s2)
    assert s2[-1] == s2[-3] + s2[-2]  # balance == totalEscrow + totalClaimable
    assert market.nonceUsed(c1, 2)


def test_settle_job_events_and_record(market, roles):
    c1, broker, op1, op2 = roles["client1"], roles["broker"], roles["op1"], roles["op2"]
    tx = settle_solo(market, broker, three_stage(market, c1, broker, 1))
    jid = job_id(str(c1), 1)
    bid = market.soloBatchId(jid)
    assert bid == "0x" + keccak(jid).hex() == batch_id_for(["0x" + jid.hex()])  # the ledger's batch of one
    cost = A + B + UNIT
    fee = cost * FEE_BPS // 10_000
    assert dict(tx.events["JobSettled"][0]) == {"jobId": "0x" + jid.hex(), "client": c1, "cost": cost, "fee": fee}
    assert [dict(e) for e in tx.events["PaymentCredited"]] == [
        {"payee": op1, "node": NODES[0].address, "batchId": bid, "amount": A},
        {"payee": op2, "node": NODES[1].address, "batchId": bid, "amount": B},
        {"payee": op2, "node": NODES[2].address, "batchId": bid, "amount": UNIT},
    ]
    assert "BatchSettled" not in tx.events  # the job is the record; no batch id is stored
    assert not market.batchSettled(broker, bid)


def test_replay_is_refused_across_paths(market, roles):
    c1, broker = roles["client1"], roles["broker"]
    settle_solo(market, broker, two_stage(market, c1, broker, 1))
    with reverts("JobMarketJobAlreadySettled", 0, c1, 1):
        settle_solo(market, broker, two_stage(market, c1, broker, 1))
    with reverts("JobMarketJobAlreadySettled", 0, c1, 1):
        settle(market, broker, "again", [two_stage(market, c1, broker, 1)])
    settle(market, broker, "first", [two_stage(market, c1, broker, 2)])
    with reverts("JobMarketJobAlreadySettled", 0, c1, 2):
        settle_solo(market, broker, two_stage(market, c1, broker, 2))


def test_only_a_broker_settles(market, roles):
    c1, broker, stranger = roles["client1"], roles["broker"], roles["op1"]
    with reverts("AccessControlUnauthorizedAccount", stranger, market.BROKER_ROLE()):
        settle_solo(market, stranger, two_stage(market, c1, broker, 1))


def test_authorization_checks(market, roles):
    c1, c2, broker = roles["client1"], roles["client2"], roles["broker"]
    job = two_stage(market, c1, broker, 1, deadline=past())
    with reverts("JobMarketAuthorizationExpired", 0):
        settle_solo(market, broker, job)
    job = two_stage(market, c1, broker, 1, deadline=future(MAX_AUTH_LIFETIME + 60))
    with reverts("JobMarketAuthorizationTooLong", 0):
        settle_solo(market, broker, job)
    with reverts("JobMarketInvalidClientSignature", 0, c1):
        settle_solo(market, broker, two_stage(market, c1, broker, 1, client_key=key_of(c2)))
    t = list(solo(two_stage(market, c1, broker, 1)))
    t[5], t[6] = b"\x00" * 32, b"\x00" * 32
    with reverts("ECDSAInvalidSignature"):
        market.settleJob(tuple(t), {"from": broker})


def test_stage_checks(market, roles):
    c1, broker = roles["client1"], roles["broker"]
    with reverts("JobMarketNoReceipts", 0):
        settle_solo(market, broker, make_job(market, c1, broker, 1, []))
    with reverts("JobMarketUnknownModel", 0, keccak(text="nope")):
        settle_solo(market, broker, two_stage(market, c1, broker, 1, model_id=keccak(text="nope")))
    gap = make_job(market, c1, broker, 1, [(NODES[0], 0, 12, A), (NODES[1], 13, MODEL_LAYERS, B)])
    with reverts("JobMarketInvalidRange", 0, 1, 13, MODEL_LAYERS, 12):
        settle_solo(market, broker, gap)
    past_end = make_job(market, c1, broker, 1, [(NODES[0], 0, 12, A), (NODES[1], 12, MODEL_LAYERS + 1, B)])
    with reverts("JobMarketInvalidRange", 0, 1, 12, MODEL_LAYERS + 1, 12):
        settle_solo(market, broker, past_end)
    short = make_job(market, c1, broker, 1, [(NODES[0], 0, 12, A), (NODES[1], 12, 29, B)])
    with reverts("JobMarketIncompleteCoverage", 0, 29, MODEL_LAYERS):
        settle_solo(market, broker, short)


def test_forged_and_foreign_receipts_are_refused(market, roles):
    c1, broker = roles["client1"], roles["broker"]
    foreign = make_job(market, c1, broker, 1, [(NODES[3], 0, MODEL_LAYERS, UNIT)])  # never registered
    with reverts("JobMarketNodeNotRoutable", 0, 0, NODES[3].address):
        settle_solo(market, broker, foreign)
    t = list(two_stage(market, c1, broker, 1).as_tuple())
    stages = [list(x) for x in t[7]]
    stages[1][3] += 1  # the amount raised after the node signed: another key recovers
    t[7] = [tuple(x) for x in stages]
    with reverts("JobMarketNodeNotRoutable", 0, 1):
        settle_solo(market, broker, tuple(t))
    t = list(solo(two_stage(market, c1, broker, 1)))
    stage = list(t[7][0])
    stage[3] = (2**256 - 1).to_bytes(32, "big")  # s in the upper half order (malleable)
    t[7] = [tuple(stage), t[7][1]]
    with reverts("ECDSAInvalidSignatureS"):
        market.settleJob(tuple(t), {"from": broker})


def test_self_dealing_is_refused(market, token, staking, registry, roles):
    c1, broker = roles["client1"], roles["broker"]
    token.transfer(broker, MIN_STAKE, {"from": roles["deployer"]})
    stake(token, staking, broker, MIN_STAKE)
    register(registry, broker, NODES[3], "peer-broker")
    own = make_job(market, c1, broker, 1, [(NODES[0], 0, 12, A), (NODES[3], 12, MODEL_LAYERS, B)])
    with reverts("JobMarketSelfDealing", 0, 1, NODES[3].address, broker):
        settle_solo(market, broker, own)


def test_unroutable_receipt_is_forfeited(market, registry, roles):
    c1, broker, op1, op2 = roles["client1"], roles["broker"], roles["op1"], roles["op2"]
    registry.deregisterNode(NODES[1].address, {"from": op2})
    tx = settle_solo(market, broker, two_stage(market, c1, broker, 1))
    jid = "0x" + job_id(str(c1), 1).hex()
    assert [dict(e) for e in tx.events["ReceiptForfeited"]] == [{"jobId": jid, "node": NODES[1].address, "amount": B}]
    fee = A * FEE_BPS // 10_000
    assert dict(tx.events["JobSettled"][0]) == {"jobId": jid, "client": c1, "cost": A, "fee": fee}
    assert [e["payee"] for e in tx.events["PaymentCredited"]] == [op1]
    assert (market.claimableOf(op1), market.claimableOf(op2)) == (A, 0)
    assert market.escrowOf(c1, broker) == 1_000 * UNIT - A - fee


def test_budget_escrow_and_spender(market, token, roles):
    c1, broker, poor = roles["client1"], roles["broker"], roles["stranger"]
    with reverts("JobMarketCostExceedsAuthorization", 0, COST + FEE, COST + FEE - 1):
        settle_solo(market, broker, two_stage(market, c1, broker, 1, max_cost=COST + FEE - 1))
    deposit(token, market, poor, broker, COST + FEE - 1)
    with reverts("JobMarketInsufficientEscrow", 0, poor, broker, COST + FEE, COST + FEE - 1):
        settle_solo(market, broker, two_stage(market, poor, broker, 1))
    spender = NODES[3]  # any key the client lets sign for it
    market.setSpender(spender.address, 0, COST + FEE, future(), {"from": c1})
    settle_solo(market, broker, two_stage(market, c1, broker, 1, client_key=spender.key))
    assert market.spenderOf(c1, spender.address)[0] == 0
    with reverts("JobMarketSpenderCapExceeded", 0, spender.address, COST + FEE, 0):
        settle_solo(market, broker, two_stage(market, c1, broker, 2, client_key=spender.key))


# ----------------------------------------------------------------------------- fee accounting


def test_fees_stay_with_the_treasury_that_earned_them(market, token, roles):
    """Fees are credited to the current treasury without a write of their own; a new treasury
    does not take the old one's, and each claims exactly its own."""
    c1, broker, treasury, new = roles["client1"], roles["broker"], roles["treasury"], roles["stranger"]
    settle_solo(market, broker, two_stage(market, c1, broker, 1))
    assert market.claimableOf(treasury) == FEE
    market.setFee(FEE_BPS, new, {"from": roles["deployer"]})
    settle_solo(market, broker, two_stage(market, c1, broker, 2))
    assert (market.claimableOf(treasury), market.claimableOf(new)) == (FEE, FEE)
    for who in (treasury, new):
        before = token.balanceOf(who)
        assert market.claim({"from": who}).events["Claimed"][0]["amount"] == FEE
        assert token.balanceOf(who) == before + FEE
        with reverts("JobMarketNothingToClaim", who):
            market.claim({"from": who})
    assert token.balanceOf(market) == market.totalEscrow() + market.totalClaimable()


# ----------------------------------------------------------------------------- one-call lookups


def test_registry_settlement_info_of_matches_per_node_lookups(market, registry, roles):
    registry.deregisterNode(NODES[2].address, {"from": roles["op2"]})
    keys = [n.address for n in NODES] + [ZERO]
    assert registry.settlementInfoOf(keccak(text="unknown-model"), keys)[0] == 0
    layers, info = registry.settlementInfoOf(MODEL_ID, keys)
    assert layers == MODEL_LAYERS
    for key, entry in zip(keys, info, strict=True):
        operator, routable = registry.settlementInfo(key)
        assert (entry & (2**160 - 1), entry >> 160) == (int(operator, 16), int(routable))
    # past one staking mask (256 keys) each operator is checked on its own, with the same answer
    many = [NODES[i % 3].address for i in range(257)]
    _, info = registry.settlementInfoOf(MODEL_ID, many)
    assert len(info) == 257
    assert info[:3] == [registry.settlementInfoOf(MODEL_ID, [k])[1][0] for k in many[:3]]
    assert info[255:] == info[:2]  # keys 255, 256 are NODES[0], NODES[1] again


def test_staking_are_active_matches_is_active(staking, roles):
    ops = [roles["op1"], roles["op2"], roles["stranger"], roles["op1"]]
    mask = staking.areActive(ops)
    bits = [bool(mask >> i & 1) for i in range(len(ops))]
    assert bits == [staking.isActive(o) for o in ops] == [True, True, False, True]
    with reverts("StakingManagerTooManyOperators", 257, 256):
        staking.areActive([ZERO] * 257)
