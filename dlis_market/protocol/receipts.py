"""A stage's receipt for a job, as every party passes it: one domain type and its forms.

The chain's struct is :class:`dlis_market.chain.market_messages.Receipt` (what the node signs,
EIP-712 ``Receipt``) with its :class:`~dlis_market.chain.market_messages.SignedReceipt`. Around
it, :class:`StageReceipt` adds what the parties learned when the receipt came in: the node address
that signed it (checked by the driver against the hop, never taken from the sender), the libp2p
peer and session it came from, the call's activation fingerprint and, on proven jobs, the last
stage's proof claim. The driver builds it, the broker records and settles it, spot checks draw
calls from it. :class:`ReceiptWire` is its JSON form in the oracle's evidence; the broker's
database row (``broker.ledger_schema.ReceiptRow``) is made from it and back in one place each.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from dlis_market.chain.market_messages import Receipt, SignedReceipt
from dlis_market.chain.typed_data import CompactSignature
from dlis_market.protocol.zk_claims import ZkClaim
from dlis_market.types import WireModel

Hex32 = Field(pattern=r"^0x[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class StageReceipt:
    """One stage's signed receipt for layers ``[start, end)`` of a job, with who signed it."""

    node: str  # the node address that signed ``signed`` (verified before this is built)
    signed: SignedReceipt
    peer_id: str = ""  # the worker it came from, when it came over libp2p
    session_id: str = ""
    fingerprint: bytes = b""  # the call's activation fingerprint the node signed (empty: 0 tokens)
    proof: ZkClaim | None = None  # the last stage's proof of its head, when the job asked for one
    # One of a group that serves the range together, each billing its share (the two workers of a
    # privacy=high job's first stage on secret shares): JobMarket pays every member of the group.
    share: bool = False

    @property
    def start(self) -> int:
        return self.signed.receipt.start

    @property
    def end(self) -> int:
        return self.signed.receipt.end

    @property
    def tokens(self) -> int:
        return self.signed.receipt.tokens

    @property
    def amount(self) -> int:
        return self.signed.receipt.amount

    @property
    def output_hash(self) -> bytes:
        return self.signed.receipt.output_hash

    @property
    def signature(self) -> bytes:
        return self.signed.signature.signature


class ReceiptWire(WireModel):
    """A signed JobMarket ``Receipt`` as JSON (hex for bytes, decimal string for the amount)."""

    job_id: str = Hex32
    model_id: str = Hex32
    start: int = Field(ge=0, lt=2**32)
    end: int = Field(ge=1, lt=2**32)
    tokens: int = Field(ge=0, lt=2**32)
    output_hash: str = Hex32
    amount: str = Field(pattern=r"^[0-9]{1,78}$")
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")

    @classmethod
    def from_signed(cls, signed: SignedReceipt) -> ReceiptWire:
        r = signed.receipt
        return cls(
            job_id="0x" + r.job_id.hex(),
            model_id="0x" + r.model_id.hex(),
            start=r.start,
            end=r.end,
            tokens=r.tokens,
            output_hash="0x" + r.output_hash.hex(),
            amount=str(r.amount),
            signature=signed.signature.hex(),
        )

    def receipt(self) -> Receipt:
        return Receipt(
            job_id=bytes.fromhex(self.job_id[2:]),
            model_id=bytes.fromhex(self.model_id[2:]),
            start=self.start,
            end=self.end,
            tokens=self.tokens,
            output_hash=bytes.fromhex(self.output_hash[2:]),
            amount=int(self.amount),
        )

    def signed(self) -> SignedReceipt:
        return SignedReceipt(self.receipt(), CompactSignature.from_bytes(bytes.fromhex(self.signature[2:])))
