"""What the broker's ledger stores: its tables, the uint256 column type, job statuses, and the
records admission writes (:class:`NewJob`). A receipt row is made from the protocol's
:class:`~dlis_market.protocol.receipts.StageReceipt` and turned back into the chain's receipt here.

Token amounts and nonces are uint256 on chain, wider than SQL integers, so they are stored as
decimal strings (:class:`Uint256`) and read back as Python ints. The transactions over these
tables are :class:`dlis_market.broker.ledger.Ledger`'s; nothing else writes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from dlis_market.chain.market_messages import Receipt, SignedReceipt
from dlis_market.chain.typed_data import CompactSignature
from dlis_market.errors import BrokerError
from dlis_market.protocol.receipts import StageReceipt


class LedgerError(BrokerError):
    """The ledger refused an operation (duplicate job, unknown job, bad state)."""


class JobStatus(StrEnum):
    """A job's life: queued -> running -> completed -> settled; or failed (nothing is owed: it never
    completed), or unpayable (completed, but JobMarket would not pay its receipts: the reason and
    its evidence are in ``error``, the receipts are kept)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    UNPAYABLE = "unpayable"
    SETTLED = "settled"


class BatchStatus(StrEnum):
    """A settlement batch: pending until its transaction is mined (settled) or refused for good
    (failed: its jobs go back to be batched again under a new id)."""

    PENDING = "pending"
    SETTLED = "settled"
    FAILED = "failed"


class Uint256(TypeDecorator[int]):
    """uint256 stored exactly as a decimal string."""

    impl = String(80)
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Any) -> str | None:
        if value is None:
            return None
        if value < 0 or value >= 2**256:
            raise LedgerError(f"{value} does not fit uint256")
        return str(int(value))

    def process_result_value(self, value: str | None, dialect: Any) -> int | None:
        return None if value is None else int(value)


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(66), primary_key=True)  # 0x + keccak(client, nonce)
    client: Mapped[str] = mapped_column(String(42), index=True)
    nonce: Mapped[int] = mapped_column(Uint256)
    model: Mapped[str] = mapped_column(String(128))
    model_id: Mapped[str] = mapped_column(String(66))
    status: Mapped[str] = mapped_column(String(16), index=True)  # a JobStatus
    request_json: Mapped[str] = mapped_column(Text)
    max_cost: Mapped[int] = mapped_column(Uint256)
    deadline: Mapped[int] = mapped_column(BigInteger)  # unix seconds: past 2038 on PostgreSQL too
    auth_signature: Mapped[str] = mapped_column(String(132))
    route_json: Mapped[str | None] = mapped_column(Text, default=None)
    answer: Mapped[str | None] = mapped_column(Text, default=None)
    token_ids_json: Mapped[str | None] = mapped_column(Text, default=None)
    prompt_tokens: Mapped[int] = mapped_column(default=0)
    completion_tokens: Mapped[int] = mapped_column(default=0)
    cost: Mapped[int | None] = mapped_column(Uint256, default=None)
    fee: Mapped[int | None] = mapped_column(Uint256, default=None)
    fallback: Mapped[bool] = mapped_column(default=False)
    ttft_ms: Mapped[float | None] = mapped_column(default=None)
    latency_ms: Mapped[float | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"), default=None, index=True)
    owner: Mapped[str | None] = mapped_column(String(64), default=None, index=True)  # broker instance running it
    created_at: Mapped[float] = mapped_column(default=time.time)
    updated_at: Mapped[float] = mapped_column(default=time.time, onupdate=time.time)

    receipts: Mapped[list[ReceiptRow]] = relationship(order_by="ReceiptRow.stage", cascade="all, delete-orphan")


class ReceiptRow(Base):
    __tablename__ = "receipts"
    __table_args__ = (UniqueConstraint("job_id", "stage"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    stage: Mapped[int]
    node: Mapped[str] = mapped_column(String(42), index=True)
    start: Mapped[int]
    end: Mapped[int]
    tokens: Mapped[int]
    output_hash: Mapped[str] = mapped_column(String(66))
    amount: Mapped[int] = mapped_column(Uint256)
    signature: Mapped[str] = mapped_column(String(132))

    @classmethod
    def of(cls, job_id: str, stage: int, r: StageReceipt) -> ReceiptRow:
        """The row of stage ``stage`` (its index in the route) of job ``job_id``."""
        return cls(
            job_id=job_id, stage=stage, node=r.node, start=r.start, end=r.end, tokens=r.tokens,
            output_hash="0x" + r.output_hash.hex(), amount=r.amount, signature="0x" + r.signature.hex(),
        )  # fmt: skip

    def column_values(self) -> dict[str, Any]:
        """This row's columns as a Core insert takes them (the database numbers ``id``)."""
        return {c.key: getattr(self, c.key) for c in RECEIPT_COLUMNS}

    def signed(self, job_id: bytes, model_id: bytes) -> SignedReceipt:
        """The chain's signed receipt this row recorded (the job's id and model are its job's)."""
        receipt = Receipt(
            job_id, model_id, self.start, self.end, self.tokens, bytes.fromhex(self.output_hash[2:]), self.amount
        )
        return SignedReceipt(receipt, CompactSignature.from_bytes(bytes.fromhex(self.signature[2:])))


RECEIPT_COLUMNS = [c for c in ReceiptRow.__table__.columns if c.key != "id"]


class BatchRow(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(66), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # a BatchStatus
    tx_hash: Mapped[str | None] = mapped_column(String(66), default=None)
    block: Mapped[int | None] = mapped_column(BigInteger, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[float] = mapped_column(default=time.time)
    updated_at: Mapped[float] = mapped_column(default=time.time, onupdate=time.time)


class InstanceRow(Base):
    """A broker process on a shared ledger and its last heartbeat (database clock, epoch seconds)."""

    __tablename__ = "broker_instances"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    started_at: Mapped[float]
    heartbeat_at: Mapped[float] = mapped_column(index=True)


class CounterRow(Base):
    """Named counters every process of a shared ledger sees (the settle epoch)."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(default=0)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    key_hash: Mapped[str] = mapped_column(String(66), primary_key=True)
    client: Mapped[str] = mapped_column(String(42))
    cap: Mapped[int] = mapped_column(Uint256)
    spent: Mapped[int] = mapped_column(Uint256, default=0)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    signer_key: Mapped[str] = mapped_column(Text)  # encrypted keyfile JSON of the client's signing key
    created_at: Mapped[float] = mapped_column(default=time.time)


class ApiKeyRequestRow(Base):
    """A signed ``ApiKeyRequest`` the broker has answered, by its EIP-712 digest: the same request
    sent again is refused, not answered with a second key."""

    __tablename__ = "api_key_requests"

    digest: Mapped[str] = mapped_column(String(66), primary_key=True)
    client: Mapped[str] = mapped_column(String(42), index=True)
    created_at: Mapped[float] = mapped_column(default=time.time)


class IdempotencyRow(Base):
    """A request that admitted a job, by its idempotency key: a retry gets the same job."""

    __tablename__ = "idempotency"

    scope: Mapped[str] = mapped_column(String(66), primary_key=True)  # client address or API key hash
    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    body_hash: Mapped[str] = mapped_column(String(66))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[float] = mapped_column(default=time.time, index=True)


@dataclass(frozen=True)
class NewJob:
    """A job as admission writes it. With a ``route`` it is written as running on that route (its
    backend session opens next; after a crash its stages are asked for receipts), else queued."""

    id: str
    client: str
    nonce: int
    model: str
    model_id: str
    request: dict[str, Any]
    max_cost: int
    deadline: int
    auth_signature: str
    route: list[dict[str, Any]] | None = None
    fallback: bool = False
    owner: str | None = None  # the broker instance that runs it (Ledger.instance)
