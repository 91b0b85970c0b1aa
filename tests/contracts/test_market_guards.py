"""JobMarket guards against a client or spender pulling money from under admitted work, and against
brokers colliding: withdrawal expiry, authorization lifetime, compare-and-set spender caps, full
revocation, per-broker batch ids. Each test performs the attack the guard stops."""

import pytest
from brownie import chain
from conftest import (
    FEE_BPS,
    MAX_AUTH_LIFETIME,
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
    make_job,
    reverts,
    settle,
    two_stage,
)
from eth_account import Account
from eth_utils import keccak

from dlis_market.chain.job_market import SignedJob, sign_authorization

pytestmark = pytest.mark.usefixtures("live")
COST = 5 * UNIT  # two_stage: 3 + 2
FEE = COST * FEE_BPS // 10_000


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    pass


# ----------------------------------------------------------------------------- withdrawals


def test_ready_withdrawal_request_expires(market, token, roles):
    """A ready request cannot be held open to pull escrow at any later moment."""
    client = roles["stranger"]
    deposit(token, market, client, 10 * UNIT)
    tx = market.requestWithdrawal(10 * UNIT, {"from": client})
    ready = tx.timestamp + WITHDRAW_DELAY
    assert tuple(market.pendingWithdrawal(client)) == (10 * UNIT, ready, ready + WITHDRAW_WINDOW)
    chain.sleep(WITHDRAW_DELAY + WITHDRAW_WINDOW + 1)
    with reverts("JobMarketWithdrawalExpired", ready, ready + WITHDRAW_WINDOW):
        market.withdraw({"from": client})
    assert market.escrowOf(client) == 10 * UNIT
    # a new request waits the whole delay again
    tx = market.requestWithdrawal(10 * UNIT, {"from": client})
    with reverts("JobMarketWithdrawalNotReady", tx.timestamp + WITHDRAW_DELAY):
        market.withdraw({"from": client})
    chain.sleep(WITHDRAW_DELAY + 1)
    assert market.withdraw({"from": client}).events["Withdrawn"][0]["amount"] == 10 * UNIT


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
    tx = market.requestWithdrawal(1_000 * UNIT, {"from": c1})
    assert tx.timestamp + WITHDRAW_DELAY > job.authorization.deadline
    chain.sleep(WITHDRAW_DELAY + 1)
    with reverts("JobMarketAuthorizationExpired", 0, job.authorization.deadline):
        settle(market, broker, "late", [job])
    assert market.withdraw({"from": c1}).events["Withdrawn"][0]["amount"] == 1_000 * UNIT


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


def test_batch_ids_are_per_broker(market, roles):
    """Another broker settling a batch with the same id does not block this broker's batch."""
    other = roles["stranger"]
    market.grantRole(market.BROKER_ROLE(), other, {"from": roles["deployer"]})
    c1, c2, broker = roles["client1"], roles["client2"], roles["broker"]
    settle(market, other, "shared", [two_stage(market, c2, other, 1)])
    assert market.batchSettled(other, batch_id("shared"))
    assert not market.batchSettled(broker, batch_id("shared"))
    settle(market, broker, "shared", [two_stage(market, c1, broker, 1)])
    assert market.batchSettled(broker, batch_id("shared"))
    with reverts("JobMarketBatchAlreadySettled", batch_id("shared")):
        settle(market, broker, "shared", [two_stage(market, c1, broker, 2)])
    assert market.escrowOf(c1) == 1_000 * UNIT - COST - FEE
