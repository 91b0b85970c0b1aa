"""Binding of contracts/JobMarket.sol: escrow, signed authorizations and receipts, batched settlement.

Three settlement paths: ``settle_batch`` (every stage signs its own ``Receipt``),
``settle_batch_merkle`` (every node signs one ``BatchReceipt`` over the Merkle root of its stages'
receipt leaves) and ``settle_job`` (one job alone on its stages' own receipts, the least gas for a
single job), plus probabilistic payment tickets (``redeem_winning_ticket``).

What the contract hashes and checks is built next door, each part against the contract's own
encoding: the job's EIP-712 messages in :mod:`.market_messages`, the Merkle batch receipts and
calldata packing in :mod:`.merkle_batch`, the tickets in :mod:`.payment_tickets`. This module is
the contract's one face: it re-exports all of them, so callers import from here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.logs import DISCARD
from web3.types import TxReceipt

from dlis_market.chain.client import ChainClient
from dlis_market.chain.dlis_token import DLISToken, fmt_units
from dlis_market.chain.errors import PreflightError
from dlis_market.chain.market_messages import (
    ForfeitedReceipt,
    JobAuthorization,
    Receipt,
    SignedJob,
    SignedReceipt,
    authorization_signer,
    market_domain,
    receipt_signer,
    sign_authorization,
    sign_receipt,
)
from dlis_market.chain.merkle_batch import (
    BatchReceipt,
    MerkleJob,
    SignedBatchReceipt,
    batch_receipts,
    merkle_batch_args,
    merkle_proof,
    merkle_root,
    node_leaves,
    pack_stage,
    receipt_leaf,
    sign_batch_receipt,
    single_job_args,
    solo_batch_id,
    verify_merkle_proof,
)
from dlis_market.chain.payment_tickets import (
    WIN_ALWAYS,
    PaymentTicket,
    rand_commitment,
    sign_payment_ticket,
    ticket_hash,
    ticket_wins,
    win_threshold,
)
from dlis_market.chain.typed_data import CompactSignature, Domain

__all__ = [
    "WIN_ALWAYS",
    "BatchReceipt",
    "ForfeitedReceipt",
    "JobAuthorization",
    "JobMarket",
    "MerkleJob",
    "PaymentTicket",
    "Receipt",
    "SignedBatchReceipt",
    "SignedJob",
    "SignedReceipt",
    "authorization_signer",
    "batch_receipts",
    "market_domain",
    "merkle_batch_args",
    "merkle_proof",
    "merkle_root",
    "node_leaves",
    "pack_stage",
    "rand_commitment",
    "receipt_leaf",
    "receipt_signer",
    "sign_authorization",
    "sign_batch_receipt",
    "sign_payment_ticket",
    "sign_receipt",
    "single_job_args",
    "solo_batch_id",
    "ticket_hash",
    "ticket_wins",
    "verify_merkle_proof",
    "win_threshold",
]


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
        self._preflight_batch(broker.address, jobs)
        fn = self.contract.functions.settleBatch(batch_id, [j.as_tuple() for j in jobs])
        return self.client.transact(broker, fn)

    def settle_batch_merkle(
        self,
        broker: LocalAccount,
        batch_id: bytes,
        jobs: Sequence[MerkleJob],
        signed: Mapping[str, SignedBatchReceipt],
    ) -> TxReceipt:
        """Settle ``jobs`` with one signed :class:`BatchReceipt` per node (``signed``: node ->
        receipt, see :func:`batch_receipts`); same escrow preflight as :meth:`settle_batch`."""
        self._preflight_batch(broker.address, jobs)
        nodes, job_tuples = merkle_batch_args(jobs, signed)
        fn = self.contract.functions.settleBatchMerkle(batch_id, nodes, job_tuples)
        return self.client.transact(broker, fn)

    def settle_job(self, broker: LocalAccount, job: SignedJob) -> TxReceipt:
        """Settle one job alone (``settleJob``) on its stages' own receipt signatures; same escrow
        preflight as :meth:`settle_batch`, and a stage billing 2**128 units or more is refused
        before sending (use :meth:`settle_batch`). No batch id is taken or stored: the stages are
        credited under :func:`solo_batch_id` of the job id, ``batchSettled`` stays false and no
        ``BatchSettled`` is emitted (the job's ``JobSettled`` event is its record). Reverts name
        ``jobIndex`` 0."""
        args = single_job_args(job)
        self._preflight_batch(broker.address, [job])
        return self.client.transact(broker, self.contract.functions.settleJob(args))

    def redeem_winning_ticket(
        self, sender: LocalAccount, ticket: PaymentTicket, signature: CompactSignature, recipient_rand: int
    ) -> TxReceipt:
        """Redeem a winning ticket (anyone may send it; the face value goes to the recipient's operator)."""
        if not ticket_wins(ticket, signature, recipient_rand):
            raise PreflightError(
                "this payment ticket does not win (keccak256(r, vs, recipientRand) >= winProb): nothing to redeem; "
                "losing tickets are the expected case and are simply dropped"
            )
        fn = self.contract.functions.redeemWinningTicket(ticket.as_tuple(), signature.r, signature.vs, recipient_rand)
        return self.client.transact(sender, fn)

    def ticket_redeemed(self, ticket_hash: bytes) -> bool:
        return bool(self.contract.functions.ticketRedeemed(ticket_hash).call())

    def _preflight_batch(self, broker: str, jobs: Sequence[SignedJob | MerkleJob]) -> None:
        """Refuse an empty batch, or one some client's escrow for ``broker`` cannot cover."""
        if not jobs:
            raise PreflightError("a settlement batch needs at least one job")
        self._preflight_escrow(broker, [(j.authorization.client, j.cost()) for j in jobs])

    def _preflight_escrow(self, broker: str, costs: Sequence[tuple[str, int]]) -> None:
        """Refuse before sending when a client's escrow for ``broker`` cannot cover its jobs'
        (client, receipts cost) in this batch plus the fee."""
        fee_bps = self.fee_bps()
        need: dict[str, int] = {}
        for client, cost in costs:
            need[client] = need.get(client, 0) + cost + cost * fee_bps // 10_000
        for client, amount in need.items():
            have = self.escrow_of(client, broker)
            if have < amount:
                raise PreflightError(
                    f"client {client} has {fmt_units(have)} DLIS in escrow for broker {broker} but the "
                    f"batch charges {fmt_units(amount)}; the client must deposit more for this broker before "
                    "these jobs settle"
                )

    def forfeited_receipts(self, receipt: TxReceipt) -> list[ForfeitedReceipt]:
        """The receipts a settlement transaction forfeited (signer deregistered or under the
        minimum stake at settlement): the client was not charged for them, nor the fee on them."""
        events = self.contract.events.ReceiptForfeited().process_receipt(receipt, errors=DISCARD)
        return [
            ForfeitedReceipt(bytes(e["args"]["jobId"]), str(e["args"]["node"]), int(e["args"]["amount"]))
            for e in events
        ]
