"""JobMarket: escrow, nonces, batched settlement, claims, fees; every revert and event."""

import pytest
from brownie import JobMarket, chain
from conftest import (
    FEE_BPS,
    MAX_AUTH_LIFETIME,
    MAX_FEE_BPS,
    MIN_STAKE,
    MODEL_LAYERS,
    NODES,
    OTHER_MODEL_ID,
    OTHER_MODEL_LAYERS,
    UNIT,
    WITHDRAW_DELAY,
    WITHDRAW_WINDOW,
    ZERO,
    batch_id,
    deposit,
    future,
    make_job,
    past,
    permit_signature,
    reverts,
    settle,
    stake,
    two_stage,
)
from eth_utils import keccak

from dlis_market.chain.job_market import SignedJob
from dlis_market.chain.typed_data import job_id

A, B = 3 * UNIT, 2 * UNIT
COST = A + B
FEE = COST * FEE_BPS // 10_000


# every test runs on the live market (staked operators, registered nodes, models, client escrow);
# the escrow tests use `fresh`, an account without escrow
pytestmark = pytest.mark.usefixtures("live")
BASE_ESCROW = 2_000 * UNIT


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    pass


@pytest.fixture
def fresh(roles):
    return roles["stranger"]


@pytest.fixture
def c1(roles):
    return roles["client1"]


@pytest.fixture
def c2(roles):
    return roles["client2"]


@pytest.fixture
def broker(roles):
    return roles["broker"]


# ----------------------------------------------------------------------------- constructor, views


def test_constructor_and_views(live, market, token, registry, roles):
    assert market.token() == token
    assert market.registry() == registry
    assert market.treasury() == roles["treasury"]
    assert market.feeBps() == FEE_BPS
    assert market.withdrawDelay() == WITHDRAW_DELAY
    assert market.withdrawWindow() == WITHDRAW_WINDOW
    assert market.maxAuthorizationLifetime() == MAX_AUTH_LIFETIME
    assert market.hasRole(market.DEFAULT_ADMIN_ROLE(), roles["deployer"])
    assert market.hasRole(market.BROKER_ROLE(), roles["broker"])
    assert market.BROKER_ROLE() == "0x" + keccak(text="BROKER_ROLE").hex()
    assert market.jobIdOf(roles["client1"], 77) == "0x" + job_id(str(roles["client1"]), 77).hex()
    assert not market.nonceUsed(roles["client1"], 77)
    assert not market.batchSettled(roles["broker"], batch_id("x"))


@pytest.mark.parametrize("which", ["token", "registry", "admin", "treasury"])
def test_constructor_zero_address(token, registry, roles, which):
    args = {"token": token, "registry": registry, "admin": roles["deployer"], "treasury": roles["treasury"]}
    args[which] = ZERO
    with reverts("JobMarketZeroAddress"):
        JobMarket.deploy(
            *args.values(), 0, WITHDRAW_DELAY, WITHDRAW_WINDOW, MAX_AUTH_LIFETIME, {"from": roles["deployer"]}
        )


def test_constructor_invalid_fee(token, registry, roles):
    with reverts("JobMarketInvalidFee", MAX_FEE_BPS + 1, MAX_FEE_BPS):
        _deploy(token, registry, roles, fee=MAX_FEE_BPS + 1)
    assert _deploy(token, registry, roles, fee=MAX_FEE_BPS).feeBps() == MAX_FEE_BPS


def _deploy(
    token, registry, roles, fee=FEE_BPS, delay=WITHDRAW_DELAY, window=WITHDRAW_WINDOW, lifetime=MAX_AUTH_LIFETIME
):
    args = (token, registry, roles["deployer"], roles["treasury"], fee, delay, window, lifetime)
    return JobMarket.deploy(*args, {"from": roles["deployer"]})


def test_constructor_refuses_authorizations_that_outlive_the_withdrawal_delay(token, registry, roles):
    """maxAuthorizationLifetime must be below withdrawDelay (and above 0), the window at least 1 s."""
    with reverts("JobMarketInvalidAuthorizationLifetime", WITHDRAW_DELAY, WITHDRAW_DELAY):
        _deploy(token, registry, roles, lifetime=WITHDRAW_DELAY)
    with reverts("JobMarketInvalidAuthorizationLifetime", WITHDRAW_DELAY + 1, WITHDRAW_DELAY):
        _deploy(token, registry, roles, lifetime=WITHDRAW_DELAY + 1)
    with reverts("JobMarketInvalidAuthorizationLifetime", 0, WITHDRAW_DELAY):
        _deploy(token, registry, roles, lifetime=0)
    with reverts("JobMarketInvalidWithdrawWindow", 0):
        _deploy(token, registry, roles, window=0)
    m = _deploy(token, registry, roles, lifetime=WITHDRAW_DELAY - 1, window=1)
    assert (m.maxAuthorizationLifetime(), m.withdrawWindow()) == (WITHDRAW_DELAY - 1, 1)


# ----------------------------------------------------------------------------- escrow


def test_deposit(market, token, fresh, broker):
    tx = deposit(token, market, fresh, broker, 10 * UNIT)
    assert dict(tx.events["Deposited"][0]) == {
        "client": fresh,
        "broker": broker,
        "from": fresh,
        "amount": 10 * UNIT,
        "escrow": 10 * UNIT,
    }
    tx = deposit(token, market, fresh, broker, 1)
    assert tx.events["Deposited"][0]["escrow"] == 10 * UNIT + 1
    assert market.escrowOf(fresh, broker) == 10 * UNIT + 1
    assert market.totalEscrow() == token.balanceOf(market) == BASE_ESCROW + 10 * UNIT + 1


def test_deposit_reverts(market, fresh, broker):
    with reverts("JobMarketZeroAmount"):
        market.deposit(broker, 0, {"from": fresh})
    with reverts("ERC20InsufficientAllowance", market, 0, 1):
        market.deposit(broker, 1, {"from": fresh})


def test_deposit_with_permit(market, token, fresh, roles, broker):
    dl = future(600)
    v, r, s = permit_signature(token, fresh, market, 7 * UNIT, dl)
    tx = market.depositWithPermit(broker, 7 * UNIT, dl, v, r, s, {"from": fresh})
    assert (tx.events["Deposited"][0]["broker"], tx.events["Deposited"][0]["amount"]) == (broker, 7 * UNIT)
    assert market.escrowOf(fresh, broker) == 7 * UNIT
    # a permit front-run by someone else is ignored when the allowance suffices
    v, r, s = permit_signature(token, fresh, market, 3 * UNIT, dl)
    token.permit(fresh, market, 3 * UNIT, dl, v, r, s, {"from": roles["stranger"]})
    market.depositWithPermit(broker, 3 * UNIT, dl, v, r, s, {"from": fresh})
    assert market.escrowOf(fresh, broker) == 10 * UNIT
    with reverts("ERC20InsufficientAllowance"):
        market.depositWithPermit(broker, 1, dl, v, r, s, {"from": fresh})
    with reverts("JobMarketZeroAmount"):
        market.depositWithPermit(broker, 0, dl, v, r, s, {"from": fresh})
    # escrow for an account that is not a broker: the whole call reverts, the permit with it
    nonce, balance = token.nonces(fresh), token.balanceOf(fresh)
    v, r, s = permit_signature(token, fresh, market, UNIT, dl)
    with reverts("JobMarketNotBroker", roles["reporter"]):
        market.depositWithPermit(roles["reporter"], UNIT, dl, v, r, s, {"from": fresh})
    assert (token.nonces(fresh), token.allowance(fresh, market), token.balanceOf(fresh)) == (nonce, 0, balance)
    assert market.escrowOf(fresh, roles["reporter"]) == 0


def test_request_withdrawal_and_withdraw(market, token, fresh, broker):
    deposit(token, market, fresh, broker, 10 * UNIT)
    tx = market.requestWithdrawal(broker, 4 * UNIT, {"from": fresh})
    ready = tx.timestamp + WITHDRAW_DELAY
    assert dict(tx.events["WithdrawalRequested"][0]) == {
        "client": fresh,
        "broker": broker,
        "amount": 4 * UNIT,
        "readyAt": ready,
    }
    assert tuple(market.pendingWithdrawal(fresh, broker)) == (4 * UNIT, ready, ready + WITHDRAW_WINDOW)
    with reverts("JobMarketWithdrawalNotReady", ready):
        market.withdraw(broker, {"from": fresh})
    chain.sleep(WITHDRAW_DELAY + 1)
    before = token.balanceOf(fresh)
    tx = market.withdraw(broker, {"from": fresh})
    assert dict(tx.events["Withdrawn"][0]) == {"client": fresh, "broker": broker, "amount": 4 * UNIT}
    assert token.balanceOf(fresh) == before + 4 * UNIT
    assert market.escrowOf(fresh, broker) == 6 * UNIT
    assert market.totalEscrow() == BASE_ESCROW + 6 * UNIT
    assert tuple(market.pendingWithdrawal(fresh, broker)) == (0, 0, 0)
    with reverts("JobMarketNoPendingWithdrawal", fresh, broker):
        market.withdraw(broker, {"from": fresh})


def test_request_withdrawal_replaces_and_restarts(market, token, fresh, broker):
    deposit(token, market, fresh, broker, 10 * UNIT)
    market.requestWithdrawal(broker, 4 * UNIT, {"from": fresh})
    chain.sleep(WITHDRAW_DELAY - 50)
    tx = market.requestWithdrawal(broker, 9 * UNIT, {"from": fresh})
    chain.sleep(100)
    with reverts("JobMarketWithdrawalNotReady", tx.timestamp + WITHDRAW_DELAY):
        market.withdraw(broker, {"from": fresh})
    chain.sleep(WITHDRAW_DELAY)
    assert market.withdraw(broker, {"from": fresh}).events["Withdrawn"][0]["amount"] == 9 * UNIT


def test_withdraw_is_capped_by_escrow(market, token, fresh, broker):
    deposit(token, market, fresh, broker, 10 * UNIT)
    market.requestWithdrawal(broker, 100 * UNIT, {"from": fresh})
    chain.sleep(WITHDRAW_DELAY + 1)
    assert market.withdraw(broker, {"from": fresh}).events["Withdrawn"][0]["amount"] == 10 * UNIT
    market.requestWithdrawal(broker, 1, {"from": fresh})
    chain.sleep(WITHDRAW_DELAY + 1)
    assert market.withdraw(broker, {"from": fresh}).events["Withdrawn"][0]["amount"] == 0
    assert market.totalEscrow() == BASE_ESCROW


def test_request_withdrawal_zero(market, fresh, broker):
    with reverts("JobMarketZeroAmount"):
        market.requestWithdrawal(broker, 0, {"from": fresh})


def test_escrow_stays_settleable_during_withdrawal_delay(live, market, token, c1, broker):
    """A pending withdrawal does not shield escrow from a job being settled."""
    market.requestWithdrawal(broker, 1_000 * UNIT, {"from": c1})
    settle(market, broker, "w", [two_stage(market, c1, broker, 1)])
    chain.sleep(WITHDRAW_DELAY + 1)
    tx = market.withdraw(broker, {"from": c1})
    assert tx.events["Withdrawn"][0]["amount"] == 1_000 * UNIT - COST - FEE
    assert market.escrowOf(c1, broker) == 0


# ----------------------------------------------------------------------------- nonces


def test_there_is_no_cancellation_that_could_race_settlement(market):
    """A served job's authorization cannot be withdrawn before settlement (nodes would go unpaid)."""
    assert not hasattr(market, "cancelNonce")


# ----------------------------------------------------------------------------- settlement


def test_settle_one_job(live, market, token, roles, c1, broker):
    op1, op2, treasury = roles["op1"], roles["op2"], roles["treasury"]
    job = two_stage(market, c1, broker, 1)
    bid = batch_id("one")
    tx = market.settleBatch(bid, [job.as_tuple()], {"from": broker})
    jid = "0x" + job_id(str(c1), 1).hex()
    assert dict(tx.events["JobSettled"][0]) == {"jobId": jid, "client": c1, "cost": COST, "fee": FEE}
    credits = [dict(e) for e in tx.events["PaymentCredited"]]
    assert credits == [
        {"payee": op1, "node": NODES[0].address, "batchId": "0x" + bid.hex(), "amount": A},
        {"payee": op2, "node": NODES[1].address, "batchId": "0x" + bid.hex(), "amount": B},
    ]
    assert dict(tx.events["BatchSettled"][0]) == {
        "batchId": "0x" + bid.hex(),
        "broker": broker,
        "jobs": 1,
        "paid": COST,
        "fees": FEE,
    }
    assert market.escrowOf(c1, broker) == 1_000 * UNIT - COST - FEE
    assert market.claimableOf(op1) == A
    assert market.claimableOf(op2) == B
    assert market.claimableOf(treasury) == FEE
    assert market.totalClaimable() == COST + FEE
    assert market.totalEscrow() == 2_000 * UNIT - COST - FEE
    assert token.balanceOf(market) == market.totalEscrow() + market.totalClaimable()
    assert market.nonceUsed(c1, 1)
    assert market.batchSettled(broker, bid)


def test_settle_batch_aggregates_payees(live, market, roles, c1, c2, broker):
    op2 = roles["op2"]
    jobs = [
        two_stage(market, c1, broker, 1),
        two_stage(market, c2, broker, 1, a=UNIT, b=UNIT),
        make_job(
            market, c1, broker, 2, [(NODES[2], 0, 1, 5), (NODES[1], 1, OTHER_MODEL_LAYERS, 7)], model_id=OTHER_MODEL_ID
        ),
        make_job(market, c2, broker, 3, [(NODES[1], 0, MODEL_LAYERS, 11)]),
        make_job(market, c2, broker, 4, [(NODES[0], 0, MODEL_LAYERS, 0)]),  # zero-amount receipt
    ]
    tx = settle(market, broker, "agg", jobs)
    paid = COST + 2 * UNIT + 12 + 11
    fees = FEE + (2 * UNIT * FEE_BPS // 10_000) + (12 * FEE_BPS // 10_000) + (11 * FEE_BPS // 10_000)
    ev = tx.events["BatchSettled"][0]
    assert (ev["jobs"], ev["paid"], ev["fees"]) == (5, paid, fees)
    assert len(tx.events["JobSettled"]) == 5
    # one credit per distinct node key, in first-seen order
    credits = [(e["node"], e["payee"], e["amount"]) for e in tx.events["PaymentCredited"]]
    assert credits == [
        (NODES[0].address, roles["op1"], A + UNIT + 0),
        (NODES[1].address, op2, B + UNIT + 7 + 11),
        (NODES[2].address, op2, 5),
    ]
    assert market.claimableOf(op2) == B + UNIT + 7 + 11 + 5
    assert market.totalClaimable() == paid + fees
    assert market.escrowOf(c1, broker) + market.escrowOf(c2, broker) == 2_000 * UNIT - paid - fees


def test_settle_with_zero_fee(live, market, roles, c1, broker):
    market.setFee(0, roles["treasury"], {"from": roles["deployer"]})
    tx = settle(market, broker, "nofee", [two_stage(market, c1, broker, 1)])
    assert tx.events["BatchSettled"][0]["fees"] == 0
    assert market.claimableOf(roles["treasury"]) == 0


def test_settle_only_broker(live, market, c1, broker, roles):
    job = two_stage(market, c1, broker, 1)
    with reverts("AccessControlUnauthorizedAccount", roles["stranger"], market.BROKER_ROLE()):
        market.settleBatch(batch_id("x"), [job.as_tuple()], {"from": roles["stranger"]})


def test_settle_empty_batch(live, market, broker):
    with reverts("JobMarketEmptyBatch"):
        market.settleBatch(batch_id("x"), [], {"from": broker})


def test_batch_id_settles_once(live, market, c1, broker):
    settle(market, broker, "dup", [two_stage(market, c1, broker, 1)])
    with reverts("JobMarketBatchAlreadySettled", batch_id("dup")):
        settle(market, broker, "dup", [two_stage(market, c1, broker, 2)])


def test_no_double_settlement(live, market, c1, broker):
    job = two_stage(market, c1, broker, 1)
    settle(market, broker, "a", [job])
    with reverts("JobMarketJobAlreadySettled", 0, c1, 1):
        settle(market, broker, "b", [job])
    with reverts("JobMarketJobAlreadySettled", 1, c1, 2):
        settle(market, broker, "c", [two_stage(market, c1, broker, 2), two_stage(market, c1, broker, 2)])


def test_batch_reverts_atomically(live, market, c1, c2, broker):
    good = two_stage(market, c1, broker, 1)
    bad = two_stage(market, c2, broker, 1, deadline=past())
    with reverts("JobMarketAuthorizationExpired", 1):
        settle(market, broker, "atomic", [good, bad])
    assert not market.nonceUsed(c1, 1)
    assert not market.batchSettled(broker, batch_id("atomic"))
    assert market.totalClaimable() == 0
    settle(market, broker, "atomic", [good])


def test_authorization_expired(live, market, c1, broker):
    dl = past()
    with reverts("JobMarketAuthorizationExpired", 0, dl):
        settle(market, broker, "x", [two_stage(market, c1, broker, 1, deadline=dl)])
    # the deadline itself is still valid
    settle(market, broker, "y", [two_stage(market, c1, broker, 2, deadline=future(30))])


def _with_auth(job: SignedJob, **changes) -> tuple:
    t = list(job.as_tuple())
    fields = {"client": 0, "modelId": 1, "maxCost": 2, "nonce": 3, "deadline": 4, "r": 5, "vs": 6, "receipts": 7}
    for k, v in changes.items():
        t[fields[k]] = v
    return tuple(t)


def test_invalid_client_signature(live, market, c1, c2, broker, roles):
    # signed by someone else's key
    forged = two_stage(market, c1, broker, 1, client_key=bytes(keccak(text="attacker")))
    with reverts("JobMarketInvalidClientSignature", 0, c1):
        settle(market, broker, "x", [forged])
    # authorization for another broker
    other = two_stage(market, c1, roles["stranger"], 1)
    with reverts("JobMarketInvalidClientSignature", 0, c1):
        settle(market, broker, "x", [other])
    # any field changed after signing
    job = two_stage(market, c1, broker, 1)
    for change in (
        {"maxCost": job.authorization.max_cost + 1},
        {"deadline": job.authorization.deadline + 1},
        {"client": c2.address},
    ):
        with reverts("JobMarketInvalidClientSignature", 0):
            market.settleBatch(batch_id("x"), [_with_auth(job, **change)], {"from": broker})
    # a broker cannot re-point receipts of client1's job to client2's escrow with client2's nonce
    with reverts("JobMarketInvalidClientSignature", 0, c2):
        market.settleBatch(batch_id("x"), [_with_auth(job, client=c2.address)], {"from": broker})


def test_malformed_client_signature(live, market, c1, broker):
    job = two_stage(market, c1, broker, 1)
    with reverts("ECDSAInvalidSignature"):
        market.settleBatch(batch_id("x"), [_with_auth(job, r=b"\x00" * 32, vs=b"\x00" * 32)], {"from": broker})


def test_unknown_model(live, market, c1, broker):
    mid = keccak(text="nope")
    with reverts("JobMarketUnknownModel", 0, mid):
        settle(market, broker, "x", [two_stage(market, c1, broker, 1, model_id=mid)])


def test_no_receipts(live, market, c1, broker):
    with reverts("JobMarketNoReceipts", 0):
        settle(market, broker, "x", [make_job(market, c1, broker, 1, [])])


@pytest.mark.parametrize(
    "stages, bad",
    [
        ([(0, 1, 12), (1, 12, 30)], (0, 0, 1, 12, 0)),  # does not start at layer 0
        ([(0, 0, 12), (1, 13, 30)], (0, 1, 13, 30, 12)),  # gap
        ([(0, 0, 12), (1, 11, 30)], (0, 1, 11, 30, 12)),  # overlap
        ([(0, 0, 12), (1, 12, 12)], (0, 1, 12, 12, 12)),  # empty range
        ([(0, 0, 12), (1, 12, 31)], (0, 1, 12, 31, 12)),  # past the last layer
        ([(0, 12, 30), (1, 0, 12)], (0, 0, 12, 30, 0)),  # out of order
    ],
)
def test_invalid_range(live, market, c1, broker, stages, bad):
    job = make_job(market, c1, broker, 1, [(NODES[n], s, e, UNIT) for n, s, e in stages])
    with reverts("JobMarketInvalidRange", *bad):
        settle(market, broker, "x", [job])


def test_incomplete_coverage(live, market, c1, broker):
    job = make_job(market, c1, broker, 1, [(NODES[0], 0, 12, UNIT), (NODES[1], 12, 29, UNIT)])
    with reverts("JobMarketIncompleteCoverage", 0, 29, MODEL_LAYERS):
        settle(market, broker, "x", [job])


def test_unregistered_signer_is_refused(live, market, c1, broker):
    # a key that was never registered (forged or foreign receipt) still fails the job
    job = make_job(market, c1, broker, 1, [(NODES[3], 0, MODEL_LAYERS, UNIT)])
    with reverts("JobMarketNodeNotRoutable", 0, 0, NODES[3].address):
        settle(market, broker, "x", [job])


def _forfeits(tx) -> list[tuple[str, str, int]]:
    if "ReceiptForfeited" not in tx.events:
        return []
    return [(e["jobId"], e["node"], e["amount"]) for e in tx.events["ReceiptForfeited"]]


def test_receipt_of_deregistered_node_is_forfeited(live, market, registry, roles, c1, broker):
    """A node deregistered after serving is not paid; the client is not charged for its receipt
    (nor the fee on it); the other stage is paid."""
    registry.deregisterNode(NODES[1].address, {"from": roles["op2"]})
    tx = settle(market, broker, "x", [two_stage(market, c1, broker, 1)])
    jid = "0x" + job_id(str(c1), 1).hex()
    assert _forfeits(tx) == [(jid, NODES[1].address, B)]
    fee = A * FEE_BPS // 10_000
    assert dict(tx.events["JobSettled"][0]) == {"jobId": jid, "client": c1, "cost": A, "fee": fee}
    assert [dict(e)["payee"] for e in tx.events["PaymentCredited"]] == [roles["op1"]]
    assert market.escrowOf(c1, broker) == 1_000 * UNIT - A - fee
    assert (market.claimableOf(roles["op1"]), market.claimableOf(roles["op2"])) == (A, 0)
    assert market.claimableOf(roles["treasury"]) == fee
    assert market.nonceUsed(c1, 1)


def test_receipts_of_slashed_operator_are_forfeited(live, market, registry, staking, token, roles, c1, c2, broker):
    """Operator under the minimum stake: every receipt of its nodes in the batch is forfeited (the
    per-batch cache included); the stake restored, its nodes are paid again."""
    staking.slash(roles["op2"], MIN_STAKE + 1, keccak(text="ev"), roles["reporter"], {"from": roles["oracle"]})
    three = make_job(
        market, c2, broker, 1, [(NODES[1], 0, 10, UNIT), (NODES[0], 10, 20, UNIT), (NODES[2], 20, 30, UNIT)]
    )
    tx = settle(market, broker, "x", [two_stage(market, c1, broker, 1), three])
    assert [f[1:] for f in _forfeits(tx)] == [(NODES[1].address, B), (NODES[1].address, UNIT), (NODES[2].address, UNIT)]
    assert market.claimableOf(roles["op1"]) == A + UNIT
    assert market.claimableOf(roles["op2"]) == 0
    assert market.escrowOf(c2, broker) == 1_000 * UNIT - UNIT - UNIT * FEE_BPS // 10_000
    stake(token, staking, roles["op2"], MIN_STAKE)
    tx = settle(market, broker, "y", [two_stage(market, c1, broker, 2)])
    assert _forfeits(tx) == []
    assert market.claimableOf(roles["op2"]) == B


def test_forged_receipt_is_refused(live, market, c1, broker):
    """A receipt whose amount was raised after the node signed recovers another key."""
    job = two_stage(market, c1, broker, 1)
    t = list(job.as_tuple())
    receipts = [list(r) for r in t[7]]
    receipts[1][3] += 1  # amount
    t[7] = [tuple(r) for r in receipts]
    with reverts("JobMarketNodeNotRoutable", 0, 1):
        market.settleBatch(batch_id("x"), [tuple(t)], {"from": broker})
    # a receipt signed for another job id is refused the same way
    other = two_stage(market, c1, broker, 2)
    t = list(job.as_tuple())
    t[7] = other.as_tuple()[7]
    with reverts("JobMarketNodeNotRoutable", 0, 0):
        market.settleBatch(batch_id("x"), [tuple(t)], {"from": broker})


def test_cost_exceeds_authorization(live, market, c1, broker):
    exact = COST + FEE
    with reverts("JobMarketCostExceedsAuthorization", 0, COST + FEE, exact - 1):
        settle(market, broker, "x", [two_stage(market, c1, broker, 1, max_cost=exact - 1)])
    settle(market, broker, "y", [two_stage(market, c1, broker, 1, max_cost=exact)])


def test_insufficient_escrow(live, market, token, roles, broker):
    poor = roles["stranger"]
    deposit(token, market, poor, broker, COST + FEE - 1)
    with reverts("JobMarketInsufficientEscrow", 0, poor, broker, COST + FEE, COST + FEE - 1):
        settle(market, broker, "x", [two_stage(market, poor, broker, 1)])
    # escrow is debited job by job within a batch
    deposit(token, market, poor, broker, COST + FEE + 1)
    with reverts("JobMarketInsufficientEscrow", 2, poor, broker, COST + FEE, 0):
        settle(market, broker, "x", [two_stage(market, poor, broker, n) for n in range(3)])
    settle(market, broker, "x", [two_stage(market, poor, broker, n) for n in range(2)])
    assert market.escrowOf(poor, broker) == 0


# ----------------------------------------------------------------------------- claims, fees


def test_claim(live, market, token, roles, c1, broker):
    settle(market, broker, "x", [two_stage(market, c1, broker, 1)])
    for who, amount in ((roles["op1"], A), (roles["op2"], B), (roles["treasury"], FEE)):
        before = token.balanceOf(who)
        tx = market.claim({"from": who})
        assert dict(tx.events["Claimed"][0]) == {"account": who, "amount": amount}
        assert token.balanceOf(who) == before + amount
        assert market.claimableOf(who) == 0
        with reverts("JobMarketNothingToClaim", who):
            market.claim({"from": who})
    assert market.totalClaimable() == 0
    assert token.balanceOf(market) == market.totalEscrow()


def test_set_fee(live, market, roles, c1, broker):
    d = {"from": roles["deployer"]}
    tx = market.setFee(1_000, roles["stranger"], d)
    assert dict(tx.events["FeeChanged"][0]) == {"feeBps": 1_000, "treasury": roles["stranger"]}
    assert (market.feeBps(), market.treasury()) == (1_000, roles["stranger"])
    settle(market, broker, "x", [two_stage(market, c1, broker, 1)])
    assert market.claimableOf(roles["stranger"]) == COST // 10
    with reverts("JobMarketInvalidFee", MAX_FEE_BPS + 1, MAX_FEE_BPS):
        market.setFee(MAX_FEE_BPS + 1, roles["treasury"], d)
    with reverts("JobMarketZeroAddress"):
        market.setFee(1, ZERO, d)
    with reverts("AccessControlUnauthorizedAccount", roles["broker"], market.DEFAULT_ADMIN_ROLE()):
        market.setFee(1, roles["treasury"], {"from": roles["broker"]})


def test_fee_raise_is_bounded_by_max_cost(live, market, roles, c1, broker):
    """The fee is read at settlement; a raise after signing can only charge up to maxCost."""
    job = two_stage(market, c1, broker, 1, max_cost=COST + FEE)
    market.setFee(MAX_FEE_BPS, roles["treasury"], {"from": roles["deployer"]})
    with reverts("JobMarketCostExceedsAuthorization", 0, COST + COST * MAX_FEE_BPS // 10_000, COST + FEE):
        settle(market, broker, "x", [job])


def test_request_withdrawal_does_not_truncate(fresh, market, token, broker):
    deposit(token, market, fresh, broker, 10 * UNIT)
    tx = market.requestWithdrawal(broker, 2**128, {"from": fresh})
    assert tx.events["WithdrawalRequested"][0]["amount"] == 2**128
    assert market.pendingWithdrawal(fresh, broker)[0] == 2**128  # stored as 0 today
