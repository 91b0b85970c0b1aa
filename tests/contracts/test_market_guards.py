"""JobMarket guards against a client or spender pulling money from under admitted work, against
brokers colliding or dealing with themselves: withdrawal expiry, authorization lifetime,
compare-and-set spender caps, full revocation, per-broker batch ids, escrow held per (client,
broker), no broker paid for a job it settles. Each test performs the attack the guard stops."""

import pytest
from brownie import chain
from conftest import (
    FEE_BPS,
    MAX_AUTH_LIFETIME,
    MIN_STAKE,
    MODEL_LAYERS,
    NODES,
    UNIT,
    WITHDRAW_DELAY,
    WITHDRAW_WINDOW,
    ZERO,
    batch_id,
    block_time,
    deposit,
    future,
    key_of,
    make_job,
    register,
    reverts,
    settle,
    stake,
    two_stage,
)
from eth_account import Account
from eth_utils import keccak

from dlis_market.chain.job_market import SignedJob, sign_authorization

pytestmark = pytest.mark.usefixtures("live")
A, B = 3 * UNIT, 2 * UNIT  # two_stage's default amounts
COST = A + B
FEE = COST * FEE_BPS // 10_000


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    pass


def _second_broker(market, roles):
    """roles["stranger"], granted BROKER_ROLE (the live clients hold no escrow for it)."""
    other = roles["stranger"]
    market.grantRole(market.BROKER_ROLE(), other, {"from": roles["deployer"]})
    return other


def _market_state(market, token, roles, brokers) -> dict:
    """Everything a settlement or deposit could move, for before/after comparisons."""
    clients = [roles["client1"], roles["client2"]]
    payees = [roles[a] for a in ("op1", "op2", "treasury")] + list(brokers)
    return {
        "totalEscrow": market.totalEscrow(),
        "totalClaimable": market.totalClaimable(),
        "balance": token.balanceOf(market),
        "escrow": [market.escrowOf(c, b) for c in clients for b in brokers],
        "claimable": [market.claimableOf(a) for a in payees],
        "nonces": [market.nonceUsed(c, n) for c in clients for n in range(4)],
    }


# ----------------------------------------------------------------------------- withdrawals


def test_ready_withdrawal_request_expires(market, token, roles):
    """A ready request cannot be held open to pull escrow at any later moment."""
    client, broker = roles["stranger"], roles["broker"]
    deposit(token, market, client, broker, 10 * UNIT)
    tx = market.requestWithdrawal(broker, 10 * UNIT, {"from": client})
    ready = tx.timestamp + WITHDRAW_DELAY
    assert tuple(market.pendingWithdrawal(client, broker)) == (10 * UNIT, ready, ready + WITHDRAW_WINDOW)
    chain.sleep(WITHDRAW_DELAY + WITHDRAW_WINDOW + 1)
    with reverts("JobMarketWithdrawalExpired", ready, ready + WITHDRAW_WINDOW):
        market.withdraw(broker, {"from": client})
    assert market.escrowOf(client, broker) == 10 * UNIT
    # a new request waits the whole delay again
    tx = market.requestWithdrawal(broker, 10 * UNIT, {"from": client})
    with reverts("JobMarketWithdrawalNotReady", tx.timestamp + WITHDRAW_DELAY):
        market.withdraw(broker, {"from": client})
    chain.sleep(WITHDRAW_DELAY + 1)
    assert market.withdraw(broker, {"from": client}).events["Withdrawn"][0]["amount"] == 10 * UNIT


def test_authorization_deadline_beyond_lifetime_is_refused(market, roles):
    c1, broker = roles["client1"], roles["broker"]
    job = two_stage(market, c1, broker, 1, deadline=future(MAX_AUTH_LIFETIME + 120))
    dl = job.authorization.deadline
    with reverts("JobMarketAuthorizationTooLong", 0, dl):
        settle(market, broker, "x", [job])
    assert not market.nonceUsed(c1, 1)
    # the same authorization settles once its deadline is within the lifetime
    chain.sleep(180)
    settle(market, broker, "x", [job])
    assert market.nonceUsed(c1, 1)


def test_job_admitted_before_a_withdrawal_request_cannot_be_charged_after_it(market, roles):
    """The longest authorization a market accepts (deadline = now + lifetime) either settles
    before a withdrawal requested at the same time is ready, or has expired by then."""
    c1, broker = roles["client1"], roles["broker"]
    job = two_stage(market, c1, broker, 1, deadline=block_time() + MAX_AUTH_LIFETIME)
    tx = market.requestWithdrawal(broker, 1_000 * UNIT, {"from": c1})
    assert tx.timestamp + WITHDRAW_DELAY > job.authorization.deadline
    chain.sleep(WITHDRAW_DELAY + 1)
    with reverts("JobMarketAuthorizationExpired", 0, job.authorization.deadline):
        settle(market, broker, "late", [job])
    assert market.withdraw(broker, {"from": c1}).events["Withdrawn"][0]["amount"] == 1_000 * UNIT


# ----------------------------------------------------------------------------- spenders


def _by_spender(market, job: SignedJob, spender) -> SignedJob:
    from conftest import chain_id

    from dlis_market.chain.job_market import market_domain

    sig = sign_authorization(spender.key, market_domain(chain_id(), market.address), job.authorization)
    return SignedJob(job.authorization, sig, job.receipts)


def test_lowering_a_spender_cap_cannot_be_front_run(market, roles):
    """The client lowers a 10-DLIS cap to 1 DLIS; the spender draws 9 first. The old overwrite
    granted 1 more (10.x in all); compare-and-set reverts the lowering instead."""
    c1, broker = roles["client1"], roles["broker"]
    spender = Account.from_key(keccak(text="spender"))
    tx = market.setSpender(spender.address, 0, 10 * UNIT, future(), {"from": c1})
    assert tx.events["SpenderSet"][0]["cap"] == 10 * UNIT
    job = make_job(market, c1, broker, 1, [(NODES[0], 0, MODEL_LAYERS, 8 * UNIT)])
    settle(market, broker, "front-run", [_by_spender(market, job, spender)])
    remaining = 10 * UNIT - 8 * UNIT - 8 * UNIT * FEE_BPS // 10_000
    with reverts("JobMarketSpenderChanged", spender.address, 10 * UNIT, remaining):
        market.setSpender(spender.address, 10 * UNIT, UNIT, future(), {"from": c1})
    assert market.spenderOf(c1, spender.address)[0] == remaining
    market.setSpender(spender.address, remaining, UNIT, future(), {"from": c1})
    assert market.spenderOf(c1, spender.address)[0] == UNIT
    with reverts("JobMarketZeroAddress"):
        market.setSpender(ZERO, 0, UNIT, future(), {"from": c1})


@pytest.mark.parametrize("how", ["cap_zero", "revoke"])
def test_revoked_spender_signature_is_refused(market, roles, how):
    """Revoking clears the expiry too: even a job that costs nothing is refused."""
    c1, broker = roles["client1"], roles["broker"]
    spender = Account.from_key(keccak(text="spender"))
    market.setSpender(spender.address, 0, 10 * UNIT, future(), {"from": c1})
    if how == "cap_zero":
        tx = market.setSpender(spender.address, 10 * UNIT, 0, future(), {"from": c1})
    else:
        tx = market.revokeSpender(spender.address, {"from": c1})
    assert dict(tx.events["SpenderSet"][0]) == {"client": c1, "spender": spender.address, "cap": 0, "expiry": 0}
    assert tuple(market.spenderOf(c1, spender.address)) == (0, 0)
    free = make_job(market, c1, broker, 1, [(NODES[0], 0, MODEL_LAYERS, 0)])
    with reverts("JobMarketInvalidClientSignature", 0, c1, spender.address):
        settle(market, broker, "x", [_by_spender(market, free, spender)])
    assert not market.nonceUsed(c1, 1)


# ----------------------------------------------------------------------------- batch ids


def test_batch_ids_are_per_broker(market, token, roles):
    """Another broker settling a batch with the same id does not block this broker's batch."""
    other = _second_broker(market, roles)
    c1, c2, broker = roles["client1"], roles["client2"], roles["broker"]
    deposit(token, market, c2, other, 10 * UNIT)
    settle(market, other, "shared", [two_stage(market, c2, other, 1)])
    assert market.batchSettled(other, batch_id("shared"))
    assert not market.batchSettled(broker, batch_id("shared"))
    settle(market, broker, "shared", [two_stage(market, c1, broker, 1)])
    assert market.batchSettled(broker, batch_id("shared"))
    with reverts("JobMarketBatchAlreadySettled", batch_id("shared")):
        settle(market, broker, "shared", [two_stage(market, c1, broker, 2)])
    assert market.escrowOf(c1, broker) == 1_000 * UNIT - COST - FEE


# ----------------------------------------------------------------------------- escrow per broker


def test_a_broker_cannot_settle_against_escrow_held_for_another(market, token, roles):
    """client1's 1,000 DLIS are held for roles["broker"]: a second broker's job against them is
    refused with 0 available and moves nothing; it settles against a part deposited for it, and
    each broker draws only from its own part."""
    c1, broker = roles["client1"], roles["broker"]
    other = _second_broker(market, roles)
    before = _market_state(market, token, roles, [broker, other])
    with reverts("JobMarketInsufficientEscrow", 0, c1, other, COST + FEE, 0):
        settle(market, other, "b2", [two_stage(market, c1, other, 1)])
    assert _market_state(market, token, roles, [broker, other]) == before
    assert not market.batchSettled(other, batch_id("b2"))

    deposit(token, market, c1, other, 10 * UNIT)
    tx = settle(market, other, "b2", [two_stage(market, c1, other, 1)])
    assert tx.events["BatchSettled"][0]["broker"] == other
    assert market.escrowOf(c1, other) == 10 * UNIT - COST - FEE
    assert market.escrowOf(c1, broker) == 1_000 * UNIT
    # the part left for the second broker is short of a second job: the first broker's part does
    # not top it up
    with reverts("JobMarketInsufficientEscrow", 0, c1, other, 2 * COST + 2 * FEE, 10 * UNIT - COST - FEE):
        settle(market, other, "b3", [two_stage(market, c1, other, 2, a=2 * 3 * UNIT, b=2 * 2 * UNIT)])
    # the first broker settles against its own part only
    settle(market, broker, "b1", [two_stage(market, c1, broker, 3)])
    assert market.escrowOf(c1, broker) == 1_000 * UNIT - COST - FEE
    assert market.escrowOf(c1, other) == 10 * UNIT - COST - FEE
    assert market.totalEscrow() == 2_010 * UNIT - 2 * (COST + FEE)
    assert token.balanceOf(market) == market.totalEscrow() + market.totalClaimable()


def test_deposit_for_an_account_without_broker_role_is_refused(market, token, roles):
    """Escrow for an account that cannot settle would be dead money: refused, nothing moves. A
    broker whose role is revoked takes no new deposits, but its clients can still withdraw."""
    client, broker = roles["stranger"], roles["broker"]
    token.approve(market, 10 * UNIT, {"from": client})
    before = (token.balanceOf(client), token.balanceOf(market), market.totalEscrow())
    for target in (roles["reporter"], client, ZERO):
        with reverts("JobMarketNotBroker", target):
            market.deposit(target, 10 * UNIT, {"from": client})
        assert market.escrowOf(client, target) == 0
    assert (token.balanceOf(client), token.balanceOf(market), market.totalEscrow()) == before
    assert token.allowance(client, market) == 10 * UNIT

    market.deposit(broker, 10 * UNIT, {"from": client})
    market.revokeRole(market.BROKER_ROLE(), broker, {"from": roles["deployer"]})
    token.approve(market, UNIT, {"from": client})
    with reverts("JobMarketNotBroker", broker):
        market.deposit(broker, UNIT, {"from": client})
    market.requestWithdrawal(broker, 10 * UNIT, {"from": client})
    chain.sleep(WITHDRAW_DELAY + 1)
    assert market.withdraw(broker, {"from": client}).events["Withdrawn"][0]["amount"] == 10 * UNIT
    assert token.balanceOf(client) == before[0]


def test_withdrawal_requests_are_per_broker(market, token, roles):
    """A ready request for broker A's part neither lets the client withdraw B's part nor reaches
    beyond A's part, however large the amount asked."""
    client, broker = roles["stranger"], roles["broker"]
    other = _second_broker(market, roles)
    deposit(token, market, client, broker, 10 * UNIT)
    deposit(token, market, client, other, 20 * UNIT)
    tx = market.requestWithdrawal(broker, 100 * UNIT, {"from": client})
    assert dict(tx.events["WithdrawalRequested"][0])["broker"] == broker
    assert tuple(market.pendingWithdrawal(client, other)) == (0, 0, 0)
    chain.sleep(WITHDRAW_DELAY + 1)
    with reverts("JobMarketNoPendingWithdrawal", client, other):
        market.withdraw(other, {"from": client})
    tx = market.withdraw(broker, {"from": client})
    assert dict(tx.events["Withdrawn"][0]) == {"client": client, "broker": broker, "amount": 10 * UNIT}
    assert (market.escrowOf(client, broker), market.escrowOf(client, other)) == (0, 20 * UNIT)

    # a request for B runs its own delay; a later request for A does not replace it
    tx = market.requestWithdrawal(other, 5 * UNIT, {"from": client})
    ready = tx.timestamp + WITHDRAW_DELAY
    market.requestWithdrawal(broker, UNIT, {"from": client})
    assert tuple(market.pendingWithdrawal(client, other)) == (5 * UNIT, ready, ready + WITHDRAW_WINDOW)
    chain.sleep(WITHDRAW_DELAY + 1)
    assert market.withdraw(other, {"from": client}).events["Withdrawn"][0]["amount"] == 5 * UNIT
    assert market.escrowOf(client, other) == 15 * UNIT
    assert market.totalEscrow() == 2_000 * UNIT + 15 * UNIT


# ----------------------------------------------------------------------------- self-dealing


def test_broker_operating_a_node_cannot_pay_it(market, token, staking, registry, roles):
    """The broker stakes and registers NODES[3] as its operator: a job it settles with a receipt of
    that node reverts (the whole batch), nothing moves. Settled by another broker, the same kind
    of job pays the node's operator normally."""
    c1, broker, deployer = roles["client1"], roles["broker"], roles["deployer"]
    other = _second_broker(market, roles)
    token.transfer(broker, MIN_STAKE, {"from": deployer})
    stake(token, staking, broker, MIN_STAKE)
    register(registry, broker, NODES[3], "peer-broker")
    own = make_job(market, c1, broker, 2, [(NODES[0], 0, 12, A), (NODES[3], 12, MODEL_LAYERS, B)])
    before = _market_state(market, token, roles, [broker, other])
    with reverts("JobMarketSelfDealing", 1, 1, NODES[3].address, broker):
        settle(market, broker, "self", [two_stage(market, c1, broker, 1), own])
    assert _market_state(market, token, roles, [broker, other]) == before
    assert not market.batchSettled(broker, batch_id("self"))

    deposit(token, market, c1, other, 10 * UNIT)
    job = make_job(market, c1, other, 2, [(NODES[0], 0, 12, A), (NODES[3], 12, MODEL_LAYERS, B)])
    settle(market, other, "fair", [job])
    assert market.claimableOf(broker) == B
    assert market.escrowOf(c1, other) == 10 * UNIT - COST - FEE


def test_broker_key_as_node_key_cannot_be_paid(market, token, registry, roles):
    """The broker's own key registered as a node under op1 (a staked operator): a receipt it signs
    in a job it settles reverts, nothing moves."""
    c1, broker = roles["client1"], roles["broker"]
    broker_key = Account.from_key(key_of(broker))
    register(registry, roles["op1"], broker_key, "peer-broker-key")
    job = make_job(market, c1, broker, 1, [(broker_key, 0, 12, A), (NODES[1], 12, MODEL_LAYERS, B)])
    before = _market_state(market, token, roles, [broker])
    with reverts("JobMarketSelfDealing", 0, 0, broker, roles["op1"]):
        settle(market, broker, "self", [job])
    assert _market_state(market, token, roles, [broker]) == before
    assert not market.batchSettled(broker, batch_id("self"))
