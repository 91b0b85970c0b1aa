"""DLISToken: fixed supply, ERC-20 events, EIP-2612 permit."""

import pytest
from brownie import DLISToken
from conftest import INITIAL_SUPPLY, UNIT, ZERO, future, past, permit_signature, reverts


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    pass


def test_constructor_mints_fixed_supply_to_holder(accounts):
    tx = DLISToken.deploy(accounts[1], 123 * UNIT, {"from": accounts[0]})
    t = DLISToken.at(tx.address)
    assert t.totalSupply() == 123 * UNIT
    assert t.balanceOf(accounts[1]) == 123 * UNIT
    assert t.balanceOf(accounts[0]) == 0
    assert (t.name(), t.symbol(), t.decimals()) == ("DLIS Token", "DLIS", 18)
    ev = t.tx.events["Transfer"][0]
    assert (ev["from"], ev["to"], ev["value"]) == (ZERO, accounts[1], 123 * UNIT)


def test_constructor_rejects_zero_holder(accounts):
    with reverts("ERC20InvalidReceiver", ZERO):
        DLISToken.deploy(ZERO, 1, {"from": accounts[0]})


def test_transfer_and_approve_events(token, roles):
    a, b = roles["client1"], roles["client2"]
    tx = token.transfer(b, 5, {"from": a})
    assert dict(tx.events["Transfer"][0]) == {"from": a, "to": b, "value": 5}
    tx = token.approve(b, 7, {"from": a})
    assert dict(tx.events["Approval"][0]) == {"owner": a, "spender": b, "value": 7}
    token.transferFrom(a, roles["stranger"], 7, {"from": b})
    assert token.allowance(a, b) == 0
    with reverts("ERC20InsufficientAllowance", b, 0, 1):
        token.transferFrom(a, b, 1, {"from": b})
    with reverts("ERC20InsufficientBalance"):
        token.transfer(a, token.balanceOf(b) + 1, {"from": b})
    assert token.totalSupply() == INITIAL_SUPPLY


def test_permit_sets_allowance_and_rejects_replay(token, roles):
    owner, spender = roles["client1"], roles["stranger"]
    deadline = future(100)
    v, r, s = permit_signature(token, owner, spender, 42, deadline)
    tx = token.permit(owner, spender, 42, deadline, v, r, s, {"from": spender})
    assert tx.events["Approval"][0]["value"] == 42
    assert token.allowance(owner, spender) == 42
    assert token.nonces(owner) == 1
    with reverts("ERC2612InvalidSigner"):
        token.permit(owner, spender, 42, deadline, v, r, s, {"from": spender})


def test_permit_expired(token, roles):
    owner, spender = roles["client1"], roles["stranger"]
    deadline = past()
    v, r, s = permit_signature(token, owner, spender, 1, deadline)
    with reverts("ERC2612ExpiredSignature", deadline):
        token.permit(owner, spender, 1, deadline, v, r, s, {"from": spender})
