"""Binding of contracts/JobMarket.sol: escrow, signed authorizations and receipts, batched settlement.

Two settlement paths: ``settle_batch`` (every stage signs its own ``Receipt``) and
``settle_batch_merkle`` (every node signs one ``BatchReceipt`` over the Merkle root of its stages'
receipt leaves, built here by :func:`merkle_root` exactly as the contract rebuilds it), plus
probabilistic payment tickets (``redeem_winning_ticket``).

Why one module of this size: it mirrors one contract. Each struct, its EIP-712 hash and Merkle
leaf, and the calldata packing must match JobMarket.sol's encoding exactly; next to the calls that
send them, a mismatch shows in one file (tests/integration/chain checks each against the contract).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from eth_abi import encode
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from web3 import Web3
from web3.logs import DISCARD
from web3.types import TxReceipt

from dlis_market.chain.client import ChainClient
from dlis_market.chain.dlis_token import DLISToken, fmt_units
from dlis_market.chain.errors import PreflightError
from dlis_market.chain.typed_data import (
    MARKET_DOMAIN,
    CompactSignature,
    Domain,
    job_id,
    recover_typed,
    sign_typed,
    type_hash,
    typed_digest,
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


# ---------------------------------------------------------------------- Merkle batch receipts

_RECEIPT_FIELDS = ["bytes32", "bytes32", "bytes32", "uint32", "uint32", "uint32", "bytes32", "uint256"]


def receipt_leaf(receipt: Receipt) -> bytes:
    """The EIP-712 struct hash of ``receipt``: its leaf in the node's batch tree (what
    ``settleBatchMerkle`` computes on chain from the stage's fields)."""
    r = receipt
    values = [type_hash("Receipt"), r.job_id, r.model_id, r.start, r.end, r.tokens, r.output_hash, r.amount]
    return bytes(keccak(encode(_RECEIPT_FIELDS, values)))


def _pair(a: bytes, b: bytes) -> bytes:
    """OpenZeppelin's ``Hashes.commutativeKeccak256``: the smaller hash first."""
    return bytes(keccak(a + b if a < b else b + a))


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root of ``leaves`` in order, as ``JobMarket._merkleRoot``: pairs (2i, 2i+1) hashed
    commutatively, an odd last element carried up; one leaf is its own root, none is 32 zero bytes."""
    level = list(leaves)
    if not level:
        return bytes(32)
    while len(level) > 1:
        nxt = [_pair(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The sibling hashes from leaf ``index`` up to :func:`merkle_root` (levels where the node is
    carried up add none): what OpenZeppelin ``MerkleProof.verify`` takes to show one job's stage is
    under a node's signed root."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf index {index} outside a tree of {len(leaves)} leaves")
    level, proof = list(leaves), []
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        nxt = [_pair(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level, index = nxt, index // 2
    return proof


def verify_merkle_proof(leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    """OpenZeppelin ``MerkleProof.verify`` (commutative hashing)."""
    h = leaf
    for sibling in proof:
        h = _pair(h, sibling)
    return h == root


@dataclass(frozen=True)
class BatchReceipt:
    """A node's one EIP-712 receipt for all its stages in a ``settleBatchMerkle`` batch."""

    node: str
    broker: str
    batch_id: bytes
    root: bytes
    total: int
    count: int

    def message(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "broker": self.broker,
            "batchId": self.batch_id,
            "root": self.root,
            "total": self.total,
            "count": self.count,
        }


@dataclass(frozen=True)
class SignedBatchReceipt:
    receipt: BatchReceipt
    signature: CompactSignature

    def as_tuple(self) -> tuple[Any, ...]:
        b = self.receipt
        return (b.node, b.root, b.total, b.count, self.signature.r, self.signature.vs)


@dataclass(frozen=True)
class MerkleJob:
    """A job for ``settleBatchMerkle``: the client's authorization and its stages as (node
    address, receipt) in layer order. The stages carry no signature: each node signs one
    :class:`BatchReceipt` for the whole batch."""

    authorization: JobAuthorization
    signature: CompactSignature
    stages: Sequence[tuple[str, Receipt]]

    @classmethod
    def from_signed(cls, job: SignedJob, domain: Domain) -> MerkleJob:
        """The same job with each stage's node recovered from its per-stage receipt signature."""
        stages = [(receipt_signer(domain, r.receipt, r.signature.signature), r.receipt) for r in job.receipts]
        return cls(job.authorization, job.signature, tuple(stages))

    def cost(self) -> int:
        return sum(r.amount for _, r in self.stages)


def node_leaves(jobs: Sequence[MerkleJob]) -> dict[str, list[Receipt]]:
    """Each node's receipts in batch order (nodes in order of first appearance): the leaves of
    the tree whose root the node signs."""
    out: dict[str, list[Receipt]] = {}
    for job in jobs:
        for node, receipt in job.stages:
            out.setdefault(Web3.to_checksum_address(node), []).append(receipt)
    return out


def batch_receipts(broker: str, batch_id: bytes, jobs: Sequence[MerkleJob]) -> dict[str, BatchReceipt]:
    """The :class:`BatchReceipt` each node of the batch must sign (node -> receipt)."""
    return {
        node: BatchReceipt(
            node,
            Web3.to_checksum_address(broker),
            batch_id,
            merkle_root([receipt_leaf(r) for r in receipts]),
            sum(r.amount for r in receipts),
            len(receipts),
        )
        for node, receipts in node_leaves(jobs).items()
    }


def sign_batch_receipt(key: bytes | str, domain: Domain, receipt: BatchReceipt) -> CompactSignature:
    return sign_typed(key, domain, "BatchReceipt", receipt.message())


def pack_stage(node_index: int, receipt: Receipt) -> int:
    """A stage's ``MerkleStage.packed`` word: node index, start, end, tokens, amount (see JobMarket.sol)."""
    r = receipt
    if r.amount >= 2**128 or node_index >= 2**32:
        raise PreflightError(
            f"a Merkle-settled stage bills below 2**128 token units and names one of fewer than 2**32 nodes; "
            f"got amount {r.amount}, node index {node_index}: settle this job with settle_batch"
        )
    return node_index << 224 | r.start << 192 | r.end << 160 | r.tokens << 128 | r.amount


def merkle_batch_args(
    jobs: Sequence[MerkleJob], signed: Mapping[str, SignedBatchReceipt]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(nodes, jobs) arguments of ``settleBatchMerkle``: nodes in order of first appearance."""
    order = list(node_leaves(jobs))
    missing = [n for n in order if n not in signed]
    if missing:
        raise PreflightError(
            f"no signed batch receipt from {len(missing)} node(s) of the batch ({', '.join(missing)}); "
            "settle their jobs with settle_batch (per-stage receipts) or ask those nodes to sign"
        )
    index = {n: i for i, n in enumerate(order)}
    job_tuples = []
    for job in jobs:
        a = job.authorization
        stages = [(pack_stage(index[Web3.to_checksum_address(n)], r), r.output_hash) for n, r in job.stages]
        sig = job.signature
        job_tuples.append((a.client, a.model_id, a.max_cost, a.nonce, a.deadline, sig.r, sig.vs, stages))
    return [signed[n].as_tuple() for n in order], job_tuples


# ---------------------------------------------------------------------- probabilistic payment tickets

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
        self._preflight_escrow(broker.address, [(j.authorization.client, j.cost()) for j in jobs])
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
        if not jobs:
            raise PreflightError("a settlement batch needs at least one job")
        self._preflight_escrow(broker.address, [(j.authorization.client, j.cost()) for j in jobs])
        nodes, job_tuples = merkle_batch_args(jobs, signed)
        fn = self.contract.functions.settleBatchMerkle(batch_id, nodes, job_tuples)
        return self.client.transact(broker, fn)

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
