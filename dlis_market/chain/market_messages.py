"""JobMarket.sol's EIP-712 messages of one job: the client's authorization, each stage's receipt,
and their signing and signer recovery.

Each struct's ``message()`` is the typed-data message JobMarket.sol hashes (field names and order
as in the contract); tests/integration/chain and tests/contracts check each against it. The
binding that sends them is :mod:`dlis_market.chain.job_market`, which re-exports these names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dlis_market.chain.typed_data import (
    MARKET_DOMAIN,
    CompactSignature,
    Domain,
    job_id,
    recover_typed,
    sign_typed,
)


@dataclass(frozen=True)
class JobAuthorization:
    """A client's EIP-712 authorization of one job (``JobAuthorization`` in JobMarket.sol)."""

    client: str
    broker: str
    model_id: bytes
    max_cost: int
    nonce: int
    deadline: int

    @property
    def job_id(self) -> bytes:
        return job_id(self.client, self.nonce)

    def message(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "broker": self.broker,
            "modelId": self.model_id,
            "maxCost": self.max_cost,
            "nonce": self.nonce,
            "deadline": self.deadline,
        }


@dataclass(frozen=True)
class Receipt:
    """One stage's EIP-712 receipt for its layers ``[start, end)`` of a job."""

    job_id: bytes
    model_id: bytes
    start: int
    end: int
    tokens: int
    output_hash: bytes
    amount: int

    def message(self) -> dict[str, Any]:
        return {
            "jobId": self.job_id,
            "modelId": self.model_id,
            "start": self.start,
            "end": self.end,
            "tokens": self.tokens,
            "outputHash": self.output_hash,
            "amount": self.amount,
        }


@dataclass(frozen=True)
class SignedReceipt:
    receipt: Receipt
    signature: CompactSignature


@dataclass(frozen=True)
class ForfeitedReceipt:
    """A receipt settlement did not pay because its signer was no longer routable (a
    ``ReceiptForfeited`` event): evidence against that node."""

    job_id: bytes
    node: str
    amount: int


@dataclass(frozen=True)
class SignedJob:
    authorization: JobAuthorization
    signature: CompactSignature
    receipts: Sequence[SignedReceipt] = field(default_factory=tuple)

    def cost(self) -> int:
        return sum(r.receipt.amount for r in self.receipts)

    def as_tuple(self) -> tuple[Any, ...]:
        a = self.authorization
        receipts = [
            (
                r.receipt.start,
                r.receipt.end,
                r.receipt.tokens,
                r.receipt.amount,
                r.receipt.output_hash,
                r.signature.r,
                r.signature.vs,
            )
            for r in self.receipts
        ]
        return (a.client, a.model_id, a.max_cost, a.nonce, a.deadline, self.signature.r, self.signature.vs, receipts)


def market_domain(chain_id: int, address: str) -> Domain:
    return Domain(MARKET_DOMAIN[0], MARKET_DOMAIN[1], chain_id, address)


def sign_authorization(key: bytes | str, domain: Domain, auth: JobAuthorization) -> CompactSignature:
    return sign_typed(key, domain, "JobAuthorization", auth.message())


def sign_receipt(key: bytes | str, domain: Domain, receipt: Receipt) -> CompactSignature:
    return sign_typed(key, domain, "Receipt", receipt.message())


def receipt_signer(domain: Domain, receipt: Receipt, signature: bytes) -> str:
    return recover_typed(domain, "Receipt", receipt.message(), signature)


def authorization_signer(domain: Domain, auth: JobAuthorization, signature: bytes) -> str:
    return recover_typed(domain, "JobAuthorization", auth.message(), signature)
