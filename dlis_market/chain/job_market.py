"""Binding of contracts/JobMarket.sol: escrow, signed authorizations and receipts, batched settlement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.logs import DISCARD
from web3.types import TxReceipt

from dlis_market.chain.client import ChainClient
from dlis_market.chain.dlis_token import DLISToken, fmt_units
from dlis_market.chain.errors import PreflightError
from dlis_market.chain.typed_data import MARKET_DOMAIN, CompactSignature, Domain, job_id, recover_typed, sign_typed


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


class JobMarket:
    def __init__(self, client: ChainClient):
        self.client = client
        self.contract = client.contract("JobMarket")
        self.address = self.contract.address
        self.token = DLISToken(client)

    def domain(self) -> Domain:
        return market_domain(self.client.chain_id, self.address)

    # ------------------------------------------------------------------ escrow
    # Escrow is held per (client, broker); ``broker`` defaults to the deployment's broker.

    def broker_or_default(self, broker: str | None) -> str:
        """``broker`` checksummed, or the broker named in this chain's deployment file."""
        return Web3.to_checksum_address(broker or self.client.deployment.broker)

    def deposit(self, client: LocalAccount, amount: int, broker: str | None = None) -> TxReceipt:
        """Add ``amount`` to ``client``'s escrow held for ``broker`` (only it can settle against it)."""
        if amount <= 0:
            raise PreflightError(f"deposit amount must be positive, got {amount}")
        broker = self.broker_or_default(broker)
        self.token.require_balance(client.address, amount)
        self.token.ensure_allowance(client, self.address, amount)
        return self.client.transact(client, self.contract.functions.deposit(broker, amount))

    def request_withdrawal(self, client: LocalAccount, amount: int, broker: str | None = None) -> TxReceipt:
        fn = self.contract.functions.requestWithdrawal(self.broker_or_default(broker), amount)
        return self.client.transact(client, fn)

    def withdraw(self, client: LocalAccount, broker: str | None = None) -> TxReceipt:
        return self.client.transact(client, self.contract.functions.withdraw(self.broker_or_default(broker)))

    def set_spender(
        self, client: LocalAccount, spender: str, cap: int, expiry: int, expected_remaining: int | None = None
    ) -> TxReceipt:
        """Let ``spender`` sign job authorizations for ``client`` up to ``cap`` units until ``expiry``
        (cap 0 revokes it fully).

        The contract replaces the remaining cap only if it still equals ``expected_remaining``
        (default: the remaining cap read just before sending); if the spender drew from it in
        between, this raises ``ContractRevertError`` ``JobMarketSpenderChanged``: read
        :meth:`spender_of` again and decide on the new cap.
        """
        if cap >= 2**128:
            raise PreflightError(f"spending cap {cap} does not fit uint128")
        spender = Web3.to_checksum_address(spender)
        if expected_remaining is None:
            expected_remaining, _ = self.spender_of(client.address, spender)
        fn = self.contract.functions.setSpender(spender, expected_remaining, cap, expiry)
        return self.client.transact(client, fn)

    def revoke_spender(self, client: LocalAccount, spender: str) -> TxReceipt:
        """Revoke ``spender`` fully, whatever is left of its cap: its signatures are refused from now on."""
        return self.client.transact(client, self.contract.functions.revokeSpender(Web3.to_checksum_address(spender)))

    def spender_of(self, client: str, spender: str) -> tuple[int, int]:
        remaining, expiry = self.contract.functions.spenderOf(
            Web3.to_checksum_address(client), Web3.to_checksum_address(spender)
        ).call()
        return int(remaining), int(expiry)

    def escrow_of(self, client: str, broker: str | None = None) -> int:
        """``client``'s escrow held for ``broker``."""
        fn = self.contract.functions.escrowOf(Web3.to_checksum_address(client), self.broker_or_default(broker))
        return int(fn.call())

    def pending_withdrawal(self, client: str, broker: str | None = None) -> tuple[int, int, int]:
        """(amount, ready_at, expires_at) of the client's withdrawal request of escrow held for
        ``broker``; usable from ready_at to expires_at inclusive; (0, 0, 0) when there is none."""
        fn = self.contract.functions.pendingWithdrawal(Web3.to_checksum_address(client), self.broker_or_default(broker))
        amount, ready, expires = fn.call()
        return int(amount), int(ready), int(expires)

    def withdraw_window(self) -> int:
        """Seconds a ready withdrawal request stays usable before it expires."""
        return int(self.contract.functions.withdrawWindow().call())

    def max_authorization_lifetime(self) -> int:
        """Most seconds an authorization's deadline may lie ahead of the settling block."""
        return int(self.contract.functions.maxAuthorizationLifetime().call())

    def claimable_of(self, account: str) -> int:
        return int(self.contract.functions.claimableOf(Web3.to_checksum_address(account)).call())

    def nonce_used(self, client: str, nonce: int) -> bool:
        return bool(self.contract.functions.nonceUsed(client, nonce).call())

    def batch_settled(self, broker: str, batch_id: bytes) -> bool:
        """Whether ``broker`` settled a batch with this id (batch ids are per broker)."""
        return bool(self.contract.functions.batchSettled(Web3.to_checksum_address(broker), batch_id).call())

    def fee_bps(self) -> int:
        return int(self.contract.functions.feeBps().call())

    def fee_for(self, cost: int) -> int:
        return cost * self.fee_bps() // 10_000

    def claim(self, account: LocalAccount) -> TxReceipt:
        have = self.claimable_of(account.address)
        if have == 0:
            raise PreflightError(f"nothing to claim for {account.address}: 0 DLIS credited by JobMarket")
        return self.client.transact(account, self.contract.functions.claim())

    # ------------------------------------------------------------------ settlement

    def settle_batch(self, broker: LocalAccount, batch_id: bytes, jobs: Sequence[SignedJob]) -> TxReceipt:
        if not jobs:
            raise PreflightError("a settlement batch needs at least one job")
        fee_bps = self.fee_bps()
        need: dict[str, int] = {}
        for job in jobs:
            cost = job.cost()
            need[job.authorization.client] = need.get(job.authorization.client, 0) + cost + cost * fee_bps // 10_000
        for client, amount in need.items():
            have = self.escrow_of(client, broker.address)
            if have < amount:
                raise PreflightError(
                    f"client {client} has {fmt_units(have)} DLIS in escrow for broker {broker.address} but the "
                    f"batch charges {fmt_units(amount)}; the client must deposit more for this broker before "
                    "these jobs settle"
                )
        fn = self.contract.functions.settleBatch(batch_id, [j.as_tuple() for j in jobs])
        return self.client.transact(broker, fn)

    def forfeited_receipts(self, receipt: TxReceipt) -> list[ForfeitedReceipt]:
        """The receipts a settlement transaction forfeited (signer deregistered or under the
        minimum stake at settlement): the client was not charged for them, nor the fee on them."""
        events = self.contract.events.ReceiptForfeited().process_receipt(receipt, errors=DISCARD)
        return [
            ForfeitedReceipt(bytes(e["args"]["jobId"]), str(e["args"]["node"]), int(e["args"]["amount"]))
            for e in events
        ]
