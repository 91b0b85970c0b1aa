"""Per-session receipts: what a stage did for a job, signed with the node key (EIP-712 ``Receipt``).

A stage keeps a :class:`ReceiptLedger` per session: tokens processed and a running sha256 over
the bytes of everything it output (hidden states, or sampled token ids at the last stage). On
close it signs a JobMarket ``Receipt`` (job id, model id, range, tokens, output hash, amount =
price per token x tokens). :func:`verify_receipt` is the driver/broker side check.

Every receipt a node signs is also kept by its leaf (its EIP-712 struct hash) in
:class:`SignedReceipts`, with the broker whose ticket opened the session: for Merkle settlement
the broker asks the node to sign one ``BatchReceipt`` over the root of its receipts in a batch
(:func:`sign_batch`), and the node signs a root only over leaves it signed itself, for that broker.

With every receipt the node also commits to the activations of the call (:class:`Commitment`: the
call's fingerprint, :mod:`dlis_market.protocol.fingerprints`, and an EIP-712 ``StageFingerprint``
binding its sha256 to the receipt's digest): a spot check validates a call from it with one
prefill on a replica instead of a full decode. :func:`verify_commitment` is the driver's check.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from eth_utils import is_address, to_checksum_address

from dlis_market.chain.job_market import (
    BatchReceipt,
    Receipt,
    SignedReceipt,
    merkle_root,
    receipt_leaf,
    sign_batch_receipt,
    sign_receipt,
)
from dlis_market.chain.typed_data import CompactSignature, Domain, recover_typed, sign_typed, typed_digest
from dlis_market.node.errors import ReceiptError
from dlis_market.protocol.errors import FingerprintError
from dlis_market.protocol.fingerprints import Fingerprint
from dlis_market.protocol.pricing import stage_charge
from dlis_market.protocol.routes import RouteHop

MAX_UINT32 = 2**32 - 1
# Most receipts one batch receipt covers (a batch of 50 jobs has at most a few per job per node):
# bounds the hashing a stranger's request costs the node.
MAX_BATCH_RECEIPTS = 4096


@dataclass
class ReceiptLedger:
    job_id: bytes
    model_id: bytes
    start: int
    end: int
    price_per_token: int
    tokens: int = 0
    broker: str | None = None  # signer of the session's ticket: the only broker a batch root is signed for
    _hash: Any = field(default_factory=hashlib.sha256)

    def record(self, tokens: int, output: bytes) -> None:
        self.tokens += tokens
        self._hash.update(output)

    def receipt(self) -> Receipt:
        return Receipt(
            job_id=self.job_id,
            model_id=self.model_id,
            start=self.start,
            end=self.end,
            tokens=min(self.tokens, MAX_UINT32),
            output_hash=self._hash.digest(),
            amount=stage_charge(self.price_per_token, self.tokens),
        )


def sign(ledger: ReceiptLedger, key: bytes, domain: Domain) -> SignedReceipt:
    receipt = ledger.receipt()
    return SignedReceipt(receipt, sign_receipt(key, domain, receipt))


def check_bill(hop: RouteHop, tokens: int, amount: int, sent_tokens: int) -> None:
    """Refuse (ReceiptError) a stage receipt billing more tokens than the driver pushed through the
    session, or more than those tokens at the price of the signed record the driver routed on."""
    if tokens > sent_tokens:
        raise ReceiptError(
            f"receipt of {hop.peer_id} bills {tokens} tokens but the session sent {sent_tokens}; refused"
        )
    if amount > stage_charge(hop.price_per_token, tokens):
        raise ReceiptError(
            f"receipt of {hop.peer_id} charges {amount}, over {tokens} tokens x its routed price {hop.price_per_token}"
        )


def checked_bill(domain: Domain, raw: Any, node: str, hop: RouteHop, job_id: bytes, sent_tokens: int) -> SignedReceipt:
    """The receipt a worker answered for its work on ``hop`` of job ``job_id``, once it is signed
    by ``node``, names that job and range, and bills within :func:`check_bill`; ReceiptError (or
    ValueError for bytes that are no receipt) otherwise. What a driver takes from a stage's
    ``close`` and from a share worker's ``share_close``."""
    signed = from_wire(raw)
    verify_receipt(domain, signed, node)
    r = signed.receipt
    if r.job_id != job_id or (r.start, r.end) != (hop.start, hop.end):
        raise ReceiptError(f"receipt of {hop.peer_id} names another job or range")
    check_bill(hop, r.tokens, r.amount, sent_tokens)
    return signed


@dataclass(frozen=True)
class Commitment:
    """A stage call's activation fingerprint and its node's ``StageFingerprint`` signature."""

    fingerprint: bytes
    signature: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "fingerprint_signature": self.signature}

    @classmethod
    def from_wire(cls, raw: Any) -> Commitment:
        try:
            fingerprint, signature = bytes(raw["fingerprint"]), bytes(raw["fingerprint_signature"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ReceiptError(
                f"stage answer carries no activation fingerprint ({exc!r} missing or malformed): every stage call "
                "commits to its outputs with its receipt; this stage runs an old or altered worker, refuse its bill"
            ) from exc
        return cls(fingerprint, signature)


def fingerprint_hash(fingerprint: bytes) -> bytes:
    """What a node's ``StageFingerprint`` signs of its fingerprint (and a runner's pass names)."""
    return hashlib.sha256(fingerprint).digest()


def _commitment_message(domain: Domain, receipt: Receipt, fingerprint: bytes) -> dict[str, Any]:
    return {
        "receiptDigest": typed_digest(domain, "Receipt", receipt.message()),
        "fingerprintHash": fingerprint_hash(fingerprint),
    }


def commit(key: bytes, domain: Domain, receipt: Receipt, fingerprint: bytes) -> Commitment:
    """The node's commitment to the fingerprint of the call ``receipt`` bills."""
    message = _commitment_message(domain, receipt, fingerprint)
    return Commitment(fingerprint, sign_typed(key, domain, "StageFingerprint", message).signature)


def verify_commitment(domain: Domain, receipt: Receipt, commitment: Commitment, node_address: str) -> Fingerprint:
    """The parsed fingerprint, if ``node_address`` signed it for exactly ``receipt`` and it covers
    the receipt's tokens; ReceiptError otherwise (the bill is refused like a forged receipt)."""
    message = _commitment_message(domain, receipt, commitment.fingerprint)
    what = f"the fingerprint of layers [{receipt.start}, {receipt.end}) (or it was signed for another receipt)"
    _require_signer(domain, "StageFingerprint", message, commitment.signature, node_address, what)
    try:
        fp = Fingerprint.from_bytes(commitment.fingerprint)
    except FingerprintError as exc:
        raise ReceiptError(f"the stage signed fingerprint bytes that do not parse: {exc}") from exc
    if fp.num_tokens != receipt.tokens:
        raise ReceiptError(
            f"the fingerprint covers {fp.num_tokens} tokens but the receipt bills {receipt.tokens}: a commitment must "
            "cover every position the stage was paid for"
        )
    return fp


def to_wire(signed: SignedReceipt) -> dict[str, Any]:
    r = signed.receipt
    return {
        "job_id": r.job_id,
        "model_id": r.model_id,
        "start": r.start,
        "end": r.end,
        "tokens": r.tokens,
        "output_hash": r.output_hash,
        "amount": str(r.amount),
        "signature": signed.signature.signature,
    }


def from_wire(raw: Any) -> SignedReceipt:
    try:
        receipt = Receipt(
            job_id=bytes(raw["job_id"]),
            model_id=bytes(raw["model_id"]),
            start=int(raw["start"]),
            end=int(raw["end"]),
            tokens=int(raw["tokens"]),
            output_hash=bytes(raw["output_hash"]),
            amount=int(raw["amount"]),
        )
        if len(receipt.job_id) != 32 or len(receipt.model_id) != 32 or len(receipt.output_hash) != 32:
            raise ValueError("job id, model id and output hash must be 32 bytes")
        return SignedReceipt(receipt, CompactSignature.from_bytes(bytes(raw["signature"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise ReceiptError(f"malformed receipt ({exc}); the stage must send every Receipt field") from exc


def verify_receipt(domain: Domain, signed: SignedReceipt, node_address: str) -> None:
    """Raise ReceiptError unless ``node_address`` signed exactly this receipt under ``domain``."""
    r = signed.receipt
    what = f"receipt for layers [{r.start}, {r.end})"
    _require_signer(domain, "Receipt", r.message(), signed.signature.signature, node_address, what)


def _require_signer(
    domain: Domain, primary: str, message: dict[str, Any], signature: bytes, node_address: str, what: str
) -> None:
    try:
        signer = recover_typed(domain, primary, message, signature)
    except (ValueError, TypeError) as exc:
        raise ReceiptError(f"{what}: signature does not parse ({exc})") from exc
    if signer.lower() != node_address.lower():
        raise ReceiptError(
            f"{what} is signed by {signer}, not by the stage's node key {node_address}: forged or altered; refuse it"
        )


class UnclaimedReceipts:
    """Signed receipts of sessions whose opener vanished before closing them (its broker was
    killed mid-job), by job id: a restarted broker fetches them (the ``receipts`` op) and settles
    what was served. Bounded in count and age; oldest go first."""

    def __init__(self, max_entries: int, max_age_s: float) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._by_job: OrderedDict[bytes, list[tuple[float, dict[str, Any]]]] = OrderedDict()
        self._count = 0

    def put(self, signed: SignedReceipt, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._by_job.setdefault(signed.receipt.job_id, []).append((now, to_wire(signed)))
        self._count += 1
        self._expire(now)

    def get(self, job_id: bytes, now: float | None = None) -> list[dict[str, Any]]:
        self._expire(time.monotonic() if now is None else now)
        return [wire for _, wire in self._by_job.get(job_id, [])]

    def _expire(self, now: float) -> None:
        while self._by_job:
            job, entries = next(iter(self._by_job.items()))
            if self._count <= self.max_entries and now - entries[-1][0] <= self.max_age_s:
                break
            del self._by_job[job]
            self._count -= len(entries)


class SignedReceipts:
    """Every receipt this node signed, by leaf (its EIP-712 struct hash, what ``settleBatchMerkle``
    rebuilds), with the broker the session was opened for: what :func:`sign_batch` may sign a
    batch root over. Bounded in count and age; oldest go first. Keeps 32 bytes and a broker address
    per receipt, not the receipt (the leaf commits to every field)."""

    def __init__(self, max_entries: int, max_age_s: float) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._by_leaf: OrderedDict[bytes, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_leaf)

    def put(self, signed: SignedReceipt, broker: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        leaf = receipt_leaf(signed.receipt)
        self._by_leaf.pop(leaf, None)
        self._by_leaf[leaf] = (now, broker.lower())
        self._expire(now)

    def broker_of(self, leaf: bytes, now: float | None = None) -> str | None:
        """The broker (lower case) whose ticket opened the session of the receipt with this leaf;
        None when this node did not sign it (or no longer keeps it)."""
        self._expire(time.monotonic() if now is None else now)
        hit = self._by_leaf.get(leaf)
        return None if hit is None else hit[1]

    def _expire(self, now: float) -> None:
        while self._by_leaf:
            leaf, (at, _) = next(iter(self._by_leaf.items()))
            if len(self._by_leaf) <= self.max_entries and now - at <= self.max_age_s:
                break
            del self._by_leaf[leaf]


def _describe(r: Receipt) -> str:
    return f"job 0x{r.job_id.hex()[:16]}.. layers [{r.start}, {r.end}), {r.tokens} tokens, amount {r.amount}"


def sign_batch(
    store: SignedReceipts,
    key: bytes,
    domain: Domain,
    node: str,
    broker: str,
    batch_id: bytes,
    wire_receipts: list[Any],
    now: float | None = None,
) -> dict[str, Any]:
    """Sign the node's ``BatchReceipt`` for ``broker``'s batch ``batch_id`` over ``wire_receipts``
    (the node's receipts in the batch, in batch order), after checking that this node signed every
    one (its leaf is in ``store``) for a session ``broker`` opened; ReceiptError naming the first
    that fails otherwise. The answer: the signed root, total, count and the signature.

    The broker's identity needs no proof here: the signature names ``broker`` and JobMarket
    accepts it only from that broker (``msg.sender``), so signing for a claimed broker gives
    nobody else anything."""
    if len(batch_id) != 32:
        raise ReceiptError(f"batch id must be 32 bytes, got {len(batch_id)}")
    if not is_address(broker):
        raise ReceiptError(f"broker {broker!r} is not an address")
    if not 0 < len(wire_receipts) <= MAX_BATCH_RECEIPTS:
        raise ReceiptError(
            f"a batch receipt covers 1 to {MAX_BATCH_RECEIPTS} receipts; got {len(wire_receipts)}: split the batch"
        )
    leaves: list[bytes] = []
    seen: set[bytes] = set()
    total = 0
    for i, raw in enumerate(wire_receipts):
        r = from_wire(raw).receipt
        leaf = receipt_leaf(r)
        opened_for = store.broker_of(leaf, now)
        if opened_for is None:
            raise ReceiptError(
                f"receipt {i} of {len(wire_receipts)} ({_describe(r)}) is not one this node signed (or it is older "
                f"than the {store.max_age_s:.0f} s / {store.max_entries} receipts kept): refusing to sign a batch "
                "root over it; settle the job with its per-stage receipts"
            )
        if opened_for != broker.lower():
            raise ReceiptError(
                f"receipt {i} of {len(wire_receipts)} ({_describe(r)}) is for a session opened by broker "
                f"{to_checksum_address(opened_for)}, not by {to_checksum_address(broker)}: only that broker may "
                "settle it"
            )
        if leaf in seen:
            raise ReceiptError(f"receipt {i} of {len(wire_receipts)} ({_describe(r)}) is listed twice in the batch")
        seen.add(leaf)
        leaves.append(leaf)
        total += r.amount
    batch = BatchReceipt(
        to_checksum_address(node), to_checksum_address(broker), batch_id, merkle_root(leaves), total, len(leaves)
    )
    sig = sign_batch_receipt(key, domain, batch)
    return {
        "node_address": batch.node,
        "root": batch.root,
        "total": str(total),
        "count": len(leaves),
        "signature": sig.signature,
    }
