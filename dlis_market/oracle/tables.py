"""The oracle database's schema: one row class per table, the status values its rows take, and
the exact uint64 column type.

Kept apart from :mod:`store`, whose methods are the transactions over these tables (each intake
all or nothing); here are only the declarations. seq values are uint64, wider than SQL integers:
stored as zero-padded decimal strings (:class:`Uint64`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import Float, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dlis_market.oracle.errors import StoreError


class EpochStatus(StrEnum):
    """``posting``: recorded, ``postEpoch`` sent or about to be; ``posted``: the chain holds its root
    and the aggregates were released; ``abandoned``: the chain holds another root for it."""

    POSTING = "posting"
    POSTED = "posted"
    ABANDONED = "abandoned"


class SlashStatus(StrEnum):
    """``intended``: verified, ``StakingManager.slash`` sent or about to be; ``done``: the chain used
    the evidence; ``failed``: the chain refused the slash (the reason is kept)."""

    INTENDED = "intended"
    DONE = "done"
    FAILED = "failed"


class Uint64(TypeDecorator[int]):
    """uint64 stored exactly as a 20-digit zero-padded decimal string (sorts as the number)."""

    impl = String(20)
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Any) -> str | None:
        if value is None:
            return None
        if value < 0 or value >= 2**64:
            raise StoreError(f"{value} does not fit uint64")
        return f"{int(value):020d}"

    def process_result_value(self, value: str | None, dialect: Any) -> int | None:
        return None if value is None else int(value)


class Base(DeclarativeBase):
    pass


class ReportRow(Base):
    """An accepted telemetry report, in the epoch it arrived in."""

    __tablename__ = "telemetry_reports"
    __table_args__ = (UniqueConstraint("node", "seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    epoch: Mapped[int] = mapped_column(index=True)
    node: Mapped[str] = mapped_column(String(42))
    seq: Mapped[int] = mapped_column(Uint64)
    received_at: Mapped[float] = mapped_column(Float)
    telemetry: Mapped[str] = mapped_column(Text)  # SignedTelemetry JSON


class CountedRow(Base):
    """A check, failure statement or observation already counted (sha256 of its key, 32 hex)."""

    __tablename__ = "counted"

    digest: Mapped[str] = mapped_column(String(32), primary_key=True)


class CheckRow(Base):
    """One verification result of a node in an epoch."""

    __tablename__ = "check_results"

    id: Mapped[int] = mapped_column(primary_key=True)
    epoch: Mapped[int] = mapped_column(index=True)
    node: Mapped[str] = mapped_column(String(42))
    passed: Mapped[bool]


class ObservationRow(Base):
    """A broker's signed observation, in the epoch it arrived in."""

    __tablename__ = "observations"

    id: Mapped[int] = mapped_column(primary_key=True)
    epoch: Mapped[int] = mapped_column(index=True)
    observation: Mapped[str] = mapped_column(Text)  # StageObservation JSON


class EpochRow(Base):
    __tablename__ = "epochs"

    epoch: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(String(16), index=True)  # an EpochStatus
    root: Mapped[str] = mapped_column(String(66))
    record: Mapped[str] = mapped_column(Text)  # EpochRecord JSON (tx filled once posted)
    contributions: Mapped[str] = mapped_column(Text)  # {node: NodeContribution}: the DP inputs


class AggregatesRow(Base):
    __tablename__ = "aggregates"

    epoch: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    aggregates: Mapped[str] = mapped_column(Text)  # Aggregates JSON


class SpentRow(Base):
    """Privacy budget a node spent in a window of ``dp_budget_window_epochs`` epochs."""

    __tablename__ = "privacy_spent"

    window: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    node: Mapped[str] = mapped_column(String(42), primary_key=True)
    spent: Mapped[float] = mapped_column(Float)


class ReleaseRow(Base):
    """One released figure of one epoch: unique, so an epoch is never charged twice."""

    __tablename__ = "privacy_releases"
    __table_args__ = (UniqueConstraint("epoch", "figure"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    epoch: Mapped[int]
    figure: Mapped[str] = mapped_column(String(32))
    epsilon: Mapped[float] = mapped_column(Float)
    nodes: Mapped[int]


class SlashRow(Base):
    __tablename__ = "slashes"

    evidence_hash: Mapped[str] = mapped_column(String(66), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)  # a SlashStatus
    epoch: Mapped[int]  # the results it yields count in this epoch (that of the evidence's arrival)
    accused_node: Mapped[str] = mapped_column(String(42))
    checker_node: Mapped[str] = mapped_column(String(42))
    operator: Mapped[str] = mapped_column(String(42))
    reporter: Mapped[str] = mapped_column(String(42))
    amount: Mapped[str] = mapped_column(String(80))  # token units asked for (uint256, decimal)
    evidence: Mapped[str] = mapped_column(Text)  # SpotCheckEvidence JSON: anyone may audit a slash
    outcome: Mapped[str | None] = mapped_column(Text, default=None)  # result JSON, or why the chain refused
