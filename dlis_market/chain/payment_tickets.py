"""Probabilistic payment tickets of JobMarket.sol (``PaymentTicket``, ``redeemWinningTicket``): a
client pays a node with tickets of which only winners are redeemed on chain.

The win rule (:func:`ticket_wins`) and the ticket's EIP-712 message are the contract's;
tests/contracts/test_tickets.py checks them against it. The binding that redeems a winner is
:mod:`dlis_market.chain.job_market`, which re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_utils import keccak

from dlis_market.chain.typed_data import CompactSignature, Domain, sign_typed, typed_digest

WIN_ALWAYS = 2**256 - 1  # winProb of a ticket that wins with probability 1 (up to 2**-256)


def win_threshold(probability: float) -> int:
    """The ``winProb`` of a ticket that wins with ``probability`` (0 < p <= 1)."""
    if not 0 < probability <= 1:
        raise ValueError(f"win probability must be in (0, 1], got {probability}")
    return WIN_ALWAYS if probability == 1 else int(probability * 2**256)


@dataclass(frozen=True)
class PaymentTicket:
    """A client's probabilistic payment to one node (``PaymentTicket`` in JobMarket.sol): pays
    ``face_value`` from the client's escrow held for ``broker`` when it wins."""

    client: str
    broker: str
    recipient: str
    face_value: int
    win_prob: int
    recipient_rand_hash: bytes
    nonce: int
    deadline: int

    def message(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "broker": self.broker,
            "recipient": self.recipient,
            "faceValue": self.face_value,
            "winProb": self.win_prob,
            "recipientRandHash": self.recipient_rand_hash,
            "nonce": self.nonce,
            "deadline": self.deadline,
        }

    def as_tuple(self) -> tuple[Any, ...]:
        return (
            self.client,
            self.broker,
            self.recipient,
            self.face_value,
            self.win_prob,
            self.recipient_rand_hash,
            self.nonce,
            self.deadline,
        )


def rand_commitment(recipient_rand: int) -> bytes:
    """keccak256(abi.encode(recipientRand)): what the recipient hands the client for its tickets."""
    return bytes(keccak(recipient_rand.to_bytes(32, "big")))


def sign_payment_ticket(key: bytes | str, domain: Domain, ticket: PaymentTicket) -> CompactSignature:
    return sign_typed(key, domain, "PaymentTicket", ticket.message())


def ticket_hash(domain: Domain, ticket: PaymentTicket) -> bytes:
    """The ticket's EIP-712 digest: its id on chain (``ticketRedeemed``)."""
    return typed_digest(domain, "PaymentTicket", ticket.message())


def ticket_wins(ticket: PaymentTicket, signature: CompactSignature, recipient_rand: int) -> bool:
    """Whether the ticket wins: keccak256(r ++ vs ++ recipientRand) < winProb, as on chain."""
    draw = keccak(signature.r + signature.vs + recipient_rand.to_bytes(32, "big"))
    return int.from_bytes(draw, "big") < ticket.win_prob
