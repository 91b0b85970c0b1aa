"""StakingManager: every external function, revert and event."""

import pytest
from brownie import StakingManager, chain
from conftest import (
    MIN_STAKE,
    REPORTER_SHARE_BPS,
    UNBONDING,
    UNIT,
    ZERO,
    future,
    permit_signature,
    reverts,
    stake,
)
from eth_utils import keccak

EVIDENCE = keccak(text="evidence-1")


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    pass


@pytest.fixture
def op(roles):
    return roles["op1"]


def test_constructor_parameters(staking, token, roles):
    assert staking.token() == token
    assert staking.treasury() == roles["treasury"]
    assert staking.minStake() == MIN_STAKE
    assert staking.unbondingPeriod() == UNBONDING
    assert staking.reporterShareBps() == REPORTER_SHARE_BPS
    assert staking.totalStaked() == 0
    assert staking.hasRole(staking.DEFAULT_ADMIN_ROLE(), roles["deployer"])
    assert staking.hasRole(staking.SLASHER_ROLE(), roles["oracle"])


@pytest.mark.parametrize("which", ["token", "admin", "treasury"])
def test_constructor_zero_address(token, roles, which):
    args = {"token": token, "admin": roles["deployer"], "treasury": roles["treasury"]}
    args[which] = ZERO
    with reverts("StakingManagerZeroAddress"):
        StakingManager.deploy(args["token"], args["admin"], args["treasury"], 1, 1, 0, {"from": roles["deployer"]})


def test_constructor_invalid_bps(token, roles):
    with reverts("StakingManagerInvalidBps", 10_001):
        StakingManager.deploy(token, roles["deployer"], roles["treasury"], 1, 1, 10_001, {"from": roles["deployer"]})


def test_stake(staking, token, op):
    before = token.balanceOf(op)
    tx = stake(token, staking, op, 150 * UNIT)
    assert dict(tx.events["Staked"][0]) == {"operator": op, "amount": 150 * UNIT, "activeStake": 150 * UNIT}
    tx = stake(token, staking, op, 1)
    assert tx.events["Staked"][0]["activeStake"] == 150 * UNIT + 1
    assert staking.activeStake(op) == 150 * UNIT + 1
    assert staking.totalStakeOf(op) == 150 * UNIT + 1
    assert staking.totalStaked() == 150 * UNIT + 1
    assert token.balanceOf(op) == before - 150 * UNIT - 1
    assert token.balanceOf(staking) == 150 * UNIT + 1


def test_stake_zero_and_without_allowance(staking, op):
    with reverts("StakingManagerZeroAmount"):
        staking.stake(0, {"from": op})
    with reverts("ERC20InsufficientAllowance", staking, 0, 5):
        staking.stake(5, {"from": op})


def test_stake_with_permit(staking, token, op, roles):
    deadline = future(600)
    v, r, s = permit_signature(token, op, staking, 200 * UNIT, deadline)
    # anyone may submit the permit first (front-run): stakeWithPermit still succeeds on the allowance
    token.permit(op, staking, 200 * UNIT, deadline, v, r, s, {"from": roles["stranger"]})
    tx = staking.stakeWithPermit(200 * UNIT, deadline, v, r, s, {"from": op})
    assert tx.events["Staked"][0]["amount"] == 200 * UNIT
    assert staking.activeStake(op) == 200 * UNIT
    assert token.allowance(op, staking) == 0


def test_stake_with_fresh_permit(staking, token, op):
    deadline = future(600)
    v, r, s = permit_signature(token, op, staking, 50 * UNIT, deadline)
    staking.stakeWithPermit(50 * UNIT, deadline, v, r, s, {"from": op})
    assert staking.activeStake(op) == 50 * UNIT
    assert token.nonces(op) == 1


def test_stake_with_bad_permit_and_no_allowance(staking, op):
    with reverts("ERC20InsufficientAllowance"):
        staking.stakeWithPermit(5, future(60), 27, b"\x01" * 32, b"\x02" * 32, {"from": op})
    with reverts("StakingManagerZeroAmount"):
        staking.stakeWithPermit(0, future(60), 27, b"\x01" * 32, b"\x02" * 32, {"from": op})


def test_is_active_threshold(staking, token, op, roles):
    assert not staking.isActive(op)
    stake(token, staking, op, MIN_STAKE - 1)
    assert not staking.isActive(op)
    stake(token, staking, op, 1)
    assert staking.isActive(op)
    staking.setMinStake(0, {"from": roles["deployer"]})
    assert staking.isActive(op)
    assert not staking.isActive(roles["stranger"])


def test_request_unstake_and_withdraw(staking, token, op):
    stake(token, staking, op, 300 * UNIT)
    tx = staking.requestUnstake(100 * UNIT, {"from": op})
    release = tx.timestamp + UNBONDING
    assert dict(tx.events["UnstakeRequested"][0]) == {
        "operator": op,
        "amount": 100 * UNIT,
        "unbondingTotal": 100 * UNIT,
        "releaseTime": release,
    }
    assert staking.activeStake(op) == 200 * UNIT
    assert tuple(staking.unbondingOf(op)) == (100 * UNIT, release)
    assert staking.totalStakeOf(op) == 300 * UNIT
    assert staking.totalStaked() == 300 * UNIT

    with reverts("StakingManagerStillUnbonding"):
        staking.withdraw({"from": op})
    chain.sleep(UNBONDING - 30)
    with reverts("StakingManagerStillUnbonding"):
        staking.withdraw({"from": op})
    chain.sleep(60)
    before = token.balanceOf(op)
    tx = staking.withdraw({"from": op})
    assert dict(tx.events["Withdrawn"][0]) == {"operator": op, "amount": 100 * UNIT}
    assert token.balanceOf(op) == before + 100 * UNIT
    assert tuple(staking.unbondingOf(op)) == (0, 0)
    assert staking.totalStaked() == 200 * UNIT
    with reverts("StakingManagerNothingUnbonding", op):
        staking.withdraw({"from": op})


def test_second_unstake_restarts_clock(staking, token, op):
    stake(token, staking, op, 300 * UNIT)
    staking.requestUnstake(100 * UNIT, {"from": op})
    chain.sleep(UNBONDING - 100)
    tx = staking.requestUnstake(50 * UNIT, {"from": op})
    assert tx.events["UnstakeRequested"][0]["unbondingTotal"] == 150 * UNIT
    chain.sleep(200)  # past the first release time, not the restarted one
    with reverts("StakingManagerStillUnbonding", tx.timestamp + UNBONDING):
        staking.withdraw({"from": op})
    chain.sleep(UNBONDING)
    assert staking.withdraw({"from": op}).events["Withdrawn"][0]["amount"] == 150 * UNIT


def test_request_unstake_reverts(staking, token, op):
    with reverts("StakingManagerZeroAmount"):
        staking.requestUnstake(0, {"from": op})
    stake(token, staking, op, 10)
    with reverts("StakingManagerInsufficientStake", 11, 10):
        staking.requestUnstake(11, {"from": op})


def test_slash_active_then_unbonding_and_split(staking, token, op, roles):
    stake(token, staking, op, 300 * UNIT)
    staking.requestUnstake(100 * UNIT, {"from": op})
    ev = keccak(text="e-a")
    tx = staking.slash(op, 250 * UNIT, ev, roles["reporter"], {"from": roles["oracle"]})
    assert tx.return_value == 250 * UNIT
    assert dict(tx.events["Slashed"][0]) == {
        "operator": op,
        "evidenceHash": "0x" + ev.hex(),
        "reporter": roles["reporter"],
        "amount": 250 * UNIT,
        "reporterShare": 125 * UNIT,
        "treasuryShare": 125 * UNIT,
    }
    assert staking.activeStake(op) == 0
    assert staking.unbondingOf(op)[0] == 50 * UNIT
    assert staking.totalStaked() == 50 * UNIT
    assert staking.evidenceUsed(ev)
    assert staking.claimableOf(roles["reporter"]) == 125 * UNIT
    assert staking.claimableOf(roles["treasury"]) == 125 * UNIT
    # the unbonding remainder is still withdrawable after its release time
    chain.sleep(UNBONDING + 1)
    assert staking.withdraw({"from": op}).events["Withdrawn"][0]["amount"] == 50 * UNIT


def test_slash_is_capped_at_total_stake(staking, token, op, roles):
    stake(token, staking, op, 40 * UNIT)
    staking.requestUnstake(10 * UNIT, {"from": op})
    tx = staking.slash(op, 10**30, EVIDENCE, roles["reporter"], {"from": roles["oracle"]})
    assert tx.return_value == 40 * UNIT
    assert tx.events["Slashed"][0]["amount"] == 40 * UNIT
    assert staking.totalStakeOf(op) == 0
    assert staking.unbondingOf(op)[0] == 0
    with reverts("StakingManagerNothingToSlash", op):
        staking.slash(op, 1, keccak(text="e2"), roles["reporter"], {"from": roles["oracle"]})
    with reverts("StakingManagerNothingUnbonding", op):
        staking.withdraw({"from": op})


def test_slash_rounding_gives_remainder_to_treasury(staking, token, op, roles):
    stake(token, staking, op, 3)
    tx = staking.slash(op, 3, EVIDENCE, roles["reporter"], {"from": roles["oracle"]})
    ev = tx.events["Slashed"][0]
    assert (ev["reporterShare"], ev["treasuryShare"]) == (1, 2)


def test_slash_reverts(staking, token, op, roles):
    o = {"from": roles["oracle"]}
    with reverts("AccessControlUnauthorizedAccount", roles["stranger"], staking.SLASHER_ROLE()):
        staking.slash(op, 1, EVIDENCE, roles["reporter"], {"from": roles["stranger"]})
    with reverts("StakingManagerZeroAmount"):
        staking.slash(op, 0, EVIDENCE, roles["reporter"], o)
    with reverts("StakingManagerZeroAddress"):
        staking.slash(op, 1, EVIDENCE, ZERO, o)
    with reverts("StakingManagerNothingToSlash", op):
        staking.slash(op, 1, EVIDENCE, roles["reporter"], o)
    stake(token, staking, op, 10)
    staking.slash(op, 1, EVIDENCE, roles["reporter"], o)
    with reverts("StakingManagerEvidenceAlreadyUsed", EVIDENCE):
        staking.slash(op, 1, EVIDENCE, roles["reporter"], o)


def test_claim(staking, token, op, roles):
    stake(token, staking, op, 100 * UNIT)
    staking.slash(op, 10 * UNIT, EVIDENCE, roles["reporter"], {"from": roles["oracle"]})
    for who in (roles["reporter"], roles["treasury"]):
        before = token.balanceOf(who)
        tx = staking.claim({"from": who})
        assert dict(tx.events["Claimed"][0]) == {"account": who, "amount": 5 * UNIT}
        assert token.balanceOf(who) == before + 5 * UNIT
        assert staking.claimableOf(who) == 0
        with reverts("StakingManagerNothingToClaim", who):
            staking.claim({"from": who})
    assert token.balanceOf(staking) == staking.totalStaked() == 90 * UNIT


def test_set_min_stake(staking, roles):
    tx = staking.setMinStake(5, {"from": roles["deployer"]})
    assert dict(tx.events["MinStakeChanged"][0]) == {"previous": MIN_STAKE, "current": 5}
    assert staking.minStake() == 5
    with reverts("AccessControlUnauthorizedAccount", roles["stranger"], staking.DEFAULT_ADMIN_ROLE()):
        staking.setMinStake(1, {"from": roles["stranger"]})


def test_set_slash_split(staking, token, op, roles):
    d = {"from": roles["deployer"]}
    tx = staking.setSlashSplit(10_000, roles["stranger"], d)
    assert dict(tx.events["SlashSplitChanged"][0]) == {"reporterShareBps": 10_000, "treasury": roles["stranger"]}
    assert staking.reporterShareBps() == 10_000
    assert staking.treasury() == roles["stranger"]
    stake(token, staking, op, 10)
    ev = staking.slash(op, 10, EVIDENCE, roles["reporter"], {"from": roles["oracle"]}).events["Slashed"][0]
    assert (ev["reporterShare"], ev["treasuryShare"]) == (10, 0)
    with reverts("StakingManagerInvalidBps", 10_001):
        staking.setSlashSplit(10_001, roles["treasury"], d)
    with reverts("StakingManagerZeroAddress"):
        staking.setSlashSplit(1, ZERO, d)
    with reverts("AccessControlUnauthorizedAccount"):
        staking.setSlashSplit(1, roles["treasury"], {"from": roles["stranger"]})


def test_role_admin(staking, roles):
    role = staking.SLASHER_ROLE()
    with reverts("AccessControlUnauthorizedAccount", roles["stranger"], staking.DEFAULT_ADMIN_ROLE()):
        staking.grantRole(role, roles["stranger"], {"from": roles["stranger"]})
    tx = staking.revokeRole(role, roles["oracle"], {"from": roles["deployer"]})
    assert "RoleRevoked" in tx.events
    with reverts("AccessControlUnauthorizedAccount", roles["oracle"], role):
        staking.slash(roles["op1"], 1, EVIDENCE, roles["reporter"], {"from": roles["oracle"]})
