"""Per-session receipts: what a stage did for a job, signed with the node key (EIP-712 ``Receipt``).

A stage keeps a :class:`ReceiptLedger` per session: tokens processed and a running sha256 over
the bytes of everything it output (hidden states, or sampled token ids at the last stage). On
close it signs a JobMarket ``Receipt`` (job id, model id, range, tokens, output hash, amount =
price per token x tokens). :func:`verify_receipt` is the driver/broker side check.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from dlis_market.chain.job_market import Receipt, SignedReceipt, receipt_signer, sign_receipt
from dlis_market.chain.typed_data import CompactSignature, Domain
from dlis_market.node.errors import ReceiptError
from dlis_market.protocol.pricing import stage_charge

MAX_UINT32 = 2**32 - 1


@dataclass
class ReceiptLedger:
    job_id: bytes
    model_id: bytes
    start: int
    end: int
    price_per_token: int
    tokens: int = 0
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
    try:
        signer = receipt_signer(domain, signed.receipt, signed.signature.signature)
    except (ValueError, TypeError) as exc:
        raise ReceiptError(f"receipt signature does not parse ({exc})") from exc
    if signer.lower() != node_address.lower():
        raise ReceiptError(
            f"receipt for layers [{signed.receipt.start}, {signed.receipt.end}) is signed by {signer}, "
            f"not by the stage's node key {node_address}: forged or altered; refuse it"
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
