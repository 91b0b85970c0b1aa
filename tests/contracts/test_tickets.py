"""JobMarket.redeemWinningTicket: probabilistic payment tickets (Livepeer-style).

A client signs a PaymentTicket to one node; it wins when keccak256(r, vs, recipientRand) < winProb
and then pays its face value from the client's escrow held for the ticket's broker. Tested as the
recipient (redeems), the client (cannot grind or cancel), and strangers (replay, forged signature,
wrong randomness, losing tickets, unroutable recipients, the broker paying itself).
"""

import pytest
from brownie import chain
from brownie.exceptions import VirtualMachineError
from conftest import (
    FEE_BPS,
    MAX_AUTH_LIFETIME,
    MIN_STAKE,
    NODES,
    UNIT,
    block_time,
    chain_id,
    error_name,
    future,
    key_of,
    read_many,
    register,
    reverts,
    stake,
)
from eth_utils import keccak

from dlis_market.chain.job_market import (
    WIN_ALWAYS,
    PaymentTicket,
    market_domain,
    rand_commitment,
    sign_payment_ticket,
    ticket_hash,
    ticket_wins,
    win_threshold,
)

pytestmark = pytest.mark.usefixtures("live")
FACE = 4 * UNIT
RAND = int.from_bytes(keccak(text="recipient-secret"), "big")


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    pass


def ticket(market, roles, nonce: int, *, win_prob: int = WIN_ALWAYS, recipient=None, key=None, **kw):
    t = PaymentTicket(
        client=str(kw.pop("client", roles["client1"])),
        broker=str(kw.pop("broker", roles["broker"])),
        recipient=(recipient or NODES[0]).address,
        face_value=kw.pop("face_value", FACE),
        win_prob=win_prob,
        recipient_rand_hash=rand_commitment(RAND),
        nonce=nonce,
        deadline=kw.pop("deadline", future(MAX_AUTH_LIFETIME // 2)),
    )
    domain = market_domain(chain_id(), market.address)
    return t, sign_payment_ticket(key or key_of(roles["client1"]), domain, t)


def redeem(market, t, sig, rand=RAND, sender=None):
    return market.redeemWinningTicket(t.as_tuple(), sig.r, sig.vs, rand, {"from": sender or t.client})


def money(market, roles) -> list:
    r = roles
    calls = [(market, "escrowOf", (r["client1"].address, r["broker"].address))]
    calls += [(market, "claimableOf", (r[a].address,)) for a in ("op1", "op2", "treasury")]
    calls += [(market, "totalEscrow", ()), (market, "totalClaimable", ())]
    return read_many(calls)


def test_winning_ticket_pays_face_value_once(market, roles):
    t, sig = ticket(market, roles, 1)
    before = money(market, roles)
    tx = redeem(market, t, sig, sender=roles["op1"])
    after = money(market, roles)
    fee = FACE * FEE_BPS // 10_000
    assert before[0] - after[0] == FACE + fee
    assert after[1] - before[1] == FACE  # op1 runs NODES[0]
    assert after[3] - before[3] == fee
    assert (before[4] - after[4], after[5] - before[5]) == (FACE + fee, FACE + fee)
    h = ticket_hash(market_domain(chain_id(), market.address), t)
    ev = tx.events["TicketRedeemed"][0]
    assert (bytes(ev["ticketHash"]), ev["operator"], ev["faceValue"], ev["fee"]) == (h, roles["op1"], FACE, fee)
    assert market.ticketRedeemed(h)
    with reverts("JobMarketTicketAlreadyRedeemed", h):
        redeem(market, t, sig, sender=roles["stranger"])
    assert money(market, roles) == after


def test_losing_wrong_forged_expired_tickets_are_refused(market, roles):
    before = money(market, roles)
    domain = market_domain(chain_id(), market.address)
    losing, sig = ticket(market, roles, 2, win_prob=1)
    with reverts("JobMarketTicketNotWinning", ticket_hash(domain, losing)):
        redeem(market, losing, sig)
    t, sig = ticket(market, roles, 3)
    h = ticket_hash(domain, t)
    with reverts("JobMarketTicketRandMismatch", h, t.recipient_rand_hash):
        redeem(market, t, sig, rand=RAND + 1)
    forged, fsig = ticket(market, roles, 4, key=keccak(text="not-the-client"))
    with reverts("JobMarketInvalidTicketSignature", ticket_hash(domain, forged), roles["client1"]):
        redeem(market, forged, fsig)
    long_lived, lsig = ticket(market, roles, 5, deadline=block_time() + 10 * MAX_AUTH_LIFETIME)
    with reverts("JobMarketTicketTooLong", ticket_hash(domain, long_lived)):
        redeem(market, long_lived, lsig)
    expiring, esig = ticket(market, roles, 6, deadline=block_time() + 5)
    chain.sleep(30)
    with reverts("JobMarketTicketExpired", ticket_hash(domain, expiring)):
        redeem(market, expiring, esig)
    poor, psig = ticket(market, roles, 7, face_value=5_000 * UNIT)
    with reverts("JobMarketTicketInsufficientEscrow", ticket_hash(domain, poor), roles["client1"], roles["broker"]):
        redeem(market, poor, psig)
    assert money(market, roles) == before


def test_recipient_must_be_routable_and_not_the_broker(market, token, staking, registry, roles):
    domain = market_domain(chain_id(), market.address)
    t, sig = ticket(market, roles, 8, recipient=NODES[3])  # never registered
    with reverts("JobMarketTicketRecipientNotRoutable", ticket_hash(domain, t), NODES[3].address):
        redeem(market, t, sig)
    broker = roles["broker"]
    token.transfer(broker, MIN_STAKE, {"from": roles["deployer"]})
    stake(token, staking, broker, MIN_STAKE)
    register(registry, broker, NODES[3], "peer-broker")
    with reverts("JobMarketTicketSelfDealing", ticket_hash(domain, t), NODES[3].address, broker):
        redeem(market, t, sig)


def test_chain_and_python_agree_on_which_tickets_win(market, roles):
    """40 tickets at p = 1/4: the chain accepts exactly those Python's ticket_wins says win (the
    client cannot tell in advance: the draw needs the recipient's secret)."""
    threshold = win_threshold(0.25)
    wins = 0
    for nonce in range(100, 140):
        t, sig = ticket(market, roles, nonce, win_prob=threshold)
        expected = ticket_wins(t, sig, RAND)
        try:
            market.redeemWinningTicket.call(t.as_tuple(), sig.r, sig.vs, RAND, {"from": roles["op1"]})
            won = True
        except VirtualMachineError as exc:  # a losing ticket, and only that, may revert
            assert error_name(exc) == "JobMarketTicketNotWinning", exc.revert_msg
            won = False
        assert won == expected, nonce
        wins += won
    assert 2 <= wins <= 20  # binomial(40, 1/4): mean 10, this range holds with probability > 0.999
