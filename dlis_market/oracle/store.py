"""The oracle's state in one transactional database (SQLAlchemy; SQLite under ``state_dir`` by default).

Why one module past 400 lines: every intake's transaction is a method here, so that "all of it
or none of it" is read in one file; the tables they write are declared in :mod:`tables`.

Every intake is one transaction, so a crash at any point leaves all of it or none of it:

* a telemetry report: one row, which is also its node's highest accepted seq (replays stay
  refused after a restart);
* a spot-check result, a runner's failure statement, a batch of observations: the results or
  observations and the keys that say they were counted (posted again, they count once);
* a slash: its verified evidence is recorded as an *intent* before ``StakingManager.slash`` is
  sent; the slash's result and the two verification results it yields are recorded together once
  the chain has it. On restart an intent is reconciled with ``StakingManager.evidenceUsed``;
* an epoch: the leaves, root and per-node privacy contributions are recorded as an intent before
  ``ReputationOracle.postEpoch`` is sent; the posted status, the noisy aggregates and the privacy
  budget they spend are recorded together once the chain has the root (a releases row per epoch and
  figure is unique: the same epoch can never be charged twice). On restart an intent is reconciled
  with the root the chain holds for the epoch.

Nothing here talks to the chain; :mod:`service` does, around these transactions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import TypeAdapter
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from dlis_market.db import open_engine
from dlis_market.oracle.epochs import EpochRecord, Proof
from dlis_market.oracle.errors import ProofNotFoundError, StoreError
from dlis_market.oracle.privacy import Aggregates, BudgetAccountant, NodeContribution
from dlis_market.oracle.tables import (
    AggregatesRow,
    Base,
    CheckRow,
    CountedRow,
    EpochRow,
    EpochStatus,
    ObservationRow,
    ReleaseRow,
    ReportRow,
    SlashRow,
    SlashStatus,
    SpentRow,
)
from dlis_market.oracle.telemetry import ReceivedTelemetry
from dlis_market.protocol.observations import StageObservation
from dlis_market.protocol.telemetry import SignedTelemetry
from dlis_market.settings import Settings

DB_FILE = "oracle.db"
CONTRIBUTIONS = TypeAdapter(dict[str, NodeContribution])
RELEASES_KEPT = 1000  # the accountant's in-memory log of releases (all stay in the table)

R = TypeVar("R", SlashRow, EpochRow)
T = TypeVar("T")


@dataclass(frozen=True)
class SlashIntent:
    evidence_hash: str
    epoch: int
    accused_node: str
    checker_node: str
    operator: str
    reporter: str
    amount: int


@dataclass(frozen=True)
class EpochIntent:
    record: EpochRecord
    contributions: dict[str, NodeContribution]


def counted_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def default_state_dir(settings: Settings) -> Path:
    return settings.oracle.state_dir or settings.home / "oracle"


def database_url(settings: Settings) -> str:
    """``oracle.database_url``, or a SQLite file under the oracle's state dir."""
    if settings.oracle.database_url:
        return settings.oracle.database_url
    return f"sqlite:///{default_state_dir(settings) / DB_FILE}"


class OracleStore:
    """The oracle's tables behind one SQLAlchemy URL.

    On SQLite (WAL journal) intake transactions (reports, checks, observations) commit with
    ``synchronous=NORMAL``: on disk for the OS when the request is answered (a killed process loses
    nothing), fsynced with the next durable commit or checkpoint. Intents and finishes (what is
    recorded before and after a chain call) commit with ``synchronous=FULL``: fsynced before the
    call is sent, together with every earlier commit (one WAL file), so even a power loss cannot
    leave the chain ahead of what the oracle recorded it meant to do.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = open_engine(url, synchronous="NORMAL")
        sqlite = self.engine.dialect.name == "sqlite"
        self._durable_engine: Engine = open_engine(url, synchronous="FULL") if sqlite else self.engine
        Base.metadata.create_all(self._durable_engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._durable_sessions = sessionmaker(self._durable_engine, expire_on_commit=False)

    @classmethod
    def open(cls, settings: Settings) -> OracleStore:
        return cls(database_url(settings))

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        with self._sessions.begin() as s:
            yield s

    @contextmanager
    def durable_session(self) -> Iterator[Session]:
        """One transaction, fsynced with all earlier ones before the block returns."""
        with self._durable_sessions.begin() as s:
            yield s

    def close(self) -> None:
        self.engine.dispose()
        self._durable_engine.dispose()

    # ------------------------------------------------------------------ telemetry

    def add_report(self, epoch: int, received: ReceivedTelemetry) -> None:
        """Keep an accepted report: its row is also its node's seq (:meth:`last_seqs`), so the two
        cannot part; the same node and seq twice is refused (unique)."""
        report = received.telemetry.report
        row = {
            "epoch": epoch,
            "node": report.node,
            "seq": report.seq,
            "received_at": received.received_at,
            "telemetry": received.telemetry.model_dump_json(),
        }
        with self.engine.begin() as conn:  # one Core statement, no ORM session: the intake's hot path
            conn.execute(insert(ReportRow), [row])

    def has_report(self, node: str, seq: int) -> bool:
        """Whether ``node``'s report ``seq`` was accepted."""
        with self.session() as s:
            return (
                s.scalar(select(ReportRow.id).where(ReportRow.node == node, ReportRow.seq == seq).limit(1)) is not None
            )

    def last_seqs(self) -> dict[str, int]:
        """The highest accepted seq of each node (seqs sort as numbers: :class:`Uint64`)."""
        with self.session() as s:
            rows = s.execute(select(ReportRow.node, func.max(ReportRow.seq)).group_by(ReportRow.node))
            return {node: int(seq) for node, seq in rows}

    def reports_after(self, epoch: int) -> list[ReceivedTelemetry]:
        """Accepted reports of the epochs after ``epoch``, in the order they were accepted."""
        with self.session() as s:
            rows = s.scalars(select(ReportRow).where(ReportRow.epoch > epoch).order_by(ReportRow.id))
            return [
                ReceivedTelemetry(received_at=r.received_at, telemetry=SignedTelemetry.model_validate_json(r.telemetry))
                for r in rows
            ]

    def report_count(self, epoch: int | None = None) -> int:
        with self.session() as s:
            q = select(func.count()).select_from(ReportRow)
            if epoch is not None:
                q = q.where(ReportRow.epoch == epoch)
            return int(s.scalar(q) or 0)

    # ------------------------------------------------------------------ checks and observations

    def count_checks(self, key: str, epoch: int, results: Sequence[tuple[str, bool]]) -> bool:
        """Record ``results`` (node, passed) in ``epoch`` unless ``key`` was counted already; the
        results and the key are written together. False (nothing written) when already counted."""
        digest = counted_digest(key)
        with self.session() as s:
            if s.get(CountedRow, digest) is not None:
                return False
            s.add(CountedRow(digest=digest))
            s.add_all(CheckRow(epoch=epoch, node=node, passed=passed) for node, passed in results)
        return True

    def checks_after(self, epoch: int) -> list[tuple[int, str, bool]]:
        """``(epoch, node, passed)`` of the epochs after ``epoch``."""
        with self.session() as s:
            rows = s.scalars(select(CheckRow).where(CheckRow.epoch > epoch).order_by(CheckRow.id))
            return [(r.epoch, r.node, r.passed) for r in rows]

    def add_observations(self, epoch: int, observations: Sequence[tuple[str, StageObservation]]) -> list[int]:
        """Keep the ``(key, observation)`` pairs whose key was not counted yet, in one transaction;
        the indexes of those kept."""
        kept: list[int] = []
        with self.session() as s:
            seen: set[str] = set()
            for i, (key, obs) in enumerate(observations):
                digest = counted_digest(key)
                if digest in seen or s.get(CountedRow, digest) is not None:
                    continue
                seen.add(digest)
                s.add(CountedRow(digest=digest))
                s.add(ObservationRow(epoch=epoch, observation=obs.model_dump_json()))
                kept.append(i)
        return kept

    def observations_after(self, epoch: int) -> list[tuple[int, StageObservation]]:
        with self.session() as s:
            rows = s.scalars(select(ObservationRow).where(ObservationRow.epoch > epoch).order_by(ObservationRow.id))
            return [(r.epoch, StageObservation.model_validate_json(r.observation)) for r in rows]

    def epochs_with_data(self, after: int, upto: int) -> list[int]:
        """Epochs in ``(after, upto]`` in which a report, check or observation arrived, ascending."""
        epochs: set[int] = set()
        with self.session() as s:
            for col in (ReportRow.epoch, CheckRow.epoch, ObservationRow.epoch):
                epochs.update(s.scalars(select(col).where(col > after, col <= upto).distinct()))
        return sorted(epochs)

    # ------------------------------------------------------------------ slashes

    def _intend(self, new: R, key: object, resume: Callable[[R], T], fresh: T) -> T:
        """Record the intent row ``new`` before its chain call is sent, durably, and answer
        ``fresh``; when a row with ``key`` is recorded already, ``resume(row)`` instead (it raises
        when that intent may not be taken up again)."""
        with self.durable_session() as s:
            row = s.get(type(new), key)
            if row is not None:
                return resume(row)
            s.add(new)
        return fresh

    def intend_slash(self, intent: SlashIntent, evidence_json: str) -> SlashIntent:
        """Record a verified slash before it is sent; the intent already recorded for the same
        evidence when there is one (a retry finishes that one; one the chain refused is retried)."""

        def resume(row: SlashRow) -> SlashIntent:
            if row.status == SlashStatus.DONE:
                raise StoreError(f"slash {intent.evidence_hash} is already done: {row.outcome}")
            row.status = SlashStatus.INTENDED
            return _intent(row)

        new = SlashRow(
            evidence_hash=intent.evidence_hash,
            status=SlashStatus.INTENDED,
            epoch=intent.epoch,
            accused_node=intent.accused_node,
            checker_node=intent.checker_node,
            operator=intent.operator,
            reporter=intent.reporter,
            amount=str(intent.amount),
            evidence=evidence_json,
        )
        return self._intend(new, intent.evidence_hash, resume, intent)

    def open_slashes(self) -> list[SlashIntent]:
        with self.session() as s:
            rows = s.scalars(select(SlashRow).where(SlashRow.status == SlashStatus.INTENDED))
            return [_intent(r) for r in rows]

    def finish_slash(self, evidence_hash: str, outcome: dict[str, object]) -> bool:
        """The chain used the evidence: mark the slash done and count its results (the accused
        failed, the checker passed) in the intent's epoch, together. False when already done."""
        with self.durable_session() as s:
            row = s.get(SlashRow, evidence_hash)
            if row is None:
                raise StoreError(f"no slash intent {evidence_hash} to finish; record it before sending the slash")
            if row.status != SlashStatus.INTENDED:
                return False
            row.status = SlashStatus.DONE
            row.outcome = json.dumps(outcome)
            s.add(CheckRow(epoch=row.epoch, node=row.accused_node, passed=False))
            s.add(CheckRow(epoch=row.epoch, node=row.checker_node, passed=True))
        return True

    def fail_slash(self, evidence_hash: str, reason: str) -> None:
        with self.durable_session() as s:
            row = s.get(SlashRow, evidence_hash)
            if row is not None and row.status == SlashStatus.INTENDED:
                row.status = SlashStatus.FAILED
                row.outcome = json.dumps({"refused": reason})

    def slash_evidence(self, evidence_hash: str) -> str | None:
        with self.session() as s:
            row = s.get(SlashRow, evidence_hash)
            return None if row is None else row.evidence

    def slashes(self, status: SlashStatus = SlashStatus.DONE) -> dict[str, str]:
        """Evidence hash -> the evidence JSON of every slash in ``status`` (an audit reads them)."""
        with self.session() as s:
            rows = s.scalars(select(SlashRow).where(SlashRow.status == status).order_by(SlashRow.evidence_hash))
            return {r.evidence_hash: r.evidence for r in rows}

    def slash_count(self) -> int:
        with self.session() as s:
            q = select(func.count()).select_from(SlashRow).where(SlashRow.status == SlashStatus.DONE)
            return int(s.scalar(q) or 0)

    # ------------------------------------------------------------------ epochs

    def intend_epoch(self, record: EpochRecord, contributions: dict[str, NodeContribution]) -> EpochIntent:
        """Record what will be posted for ``record.epoch`` before it is sent; the intent already
        recorded for that epoch when there is one (the same root is posted again, never another)."""

        def resume(row: EpochRow) -> EpochIntent:
            if row.status != EpochStatus.POSTING:
                raise StoreError(f"epoch {record.epoch} is already {row.status}; it is not posted again")
            return _epoch_intent(row)

        new = EpochRow(
            epoch=record.epoch,
            status=EpochStatus.POSTING,
            root=record.root,
            record=record.model_dump_json(),
            contributions=CONTRIBUTIONS.dump_json(contributions).decode(),
        )
        return self._intend(new, record.epoch, resume, EpochIntent(record, contributions))

    def epoch_intent(self, epoch: int) -> EpochIntent | None:
        with self.session() as s:
            row = s.get(EpochRow, epoch)
            return _epoch_intent(row) if row is not None and row.status == EpochStatus.POSTING else None

    def open_epochs(self) -> list[EpochIntent]:
        with self.session() as s:
            rows = s.scalars(select(EpochRow).where(EpochRow.status == EpochStatus.POSTING).order_by(EpochRow.epoch))
            return [_epoch_intent(r) for r in rows]

    def epoch_status(self, epoch: int) -> EpochStatus | None:
        with self.session() as s:
            row = s.get(EpochRow, epoch)
            return None if row is None else EpochStatus(row.status)

    def finish_epoch(self, record: EpochRecord, aggregates: Aggregates, accountant: BudgetAccountant) -> None:
        """The chain holds ``record.root``: mark the epoch posted, store its aggregates and the privacy
        budget they spent (``accountant`` after the charge), together."""
        with self.durable_session() as s:
            row = s.get(EpochRow, record.epoch)
            if row is None or row.status != EpochStatus.POSTING:
                state = "not recorded" if row is None else row.status
                raise StoreError(f"epoch {record.epoch} is {state}, not posting: nothing to finish")
            row.status = EpochStatus.POSTED
            row.record = record.model_dump_json()
            s.add(AggregatesRow(epoch=record.epoch, aggregates=aggregates.model_dump_json()))
            for node, spent in accountant.spent.items():
                s.merge(SpentRow(window=accountant.window, node=node, spent=spent))
            for r in accountant.releases:
                if r["epoch"] == record.epoch:
                    s.add(ReleaseRow(epoch=r["epoch"], figure=r["figure"], epsilon=r["epsilon"], nodes=r["nodes"]))

    def abandon_epoch(self, epoch: int) -> None:
        with self.durable_session() as s:
            row = s.get(EpochRow, epoch)
            if row is not None and row.status == EpochStatus.POSTING:
                row.status = EpochStatus.ABANDONED

    def posted_epochs(self) -> list[int]:
        with self.session() as s:
            q = select(EpochRow.epoch).where(EpochRow.status == EpochStatus.POSTED).order_by(EpochRow.epoch)
            return list(s.scalars(q))

    def load_epoch(self, epoch: int) -> EpochRecord:
        with self.session() as s:
            row = s.get(EpochRow, epoch)
            if row is None or row.status != EpochStatus.POSTED:
                raise ProofNotFoundError(
                    f"no posted epoch {epoch} in the oracle database {self.url}; run the proof on the oracle "
                    "host or pass --state-dir to where its database is kept"
                )
            return EpochRecord.model_validate_json(row.record)

    def proof(self, node: str, epoch: int) -> Proof:
        return self.load_epoch(epoch).proof(node)

    def aggregates(self, epoch: int | None = None) -> Aggregates | None:
        """The aggregates of ``epoch``, or of the latest epoch released (None when there are none)."""
        with self.session() as s:
            q = select(AggregatesRow)
            q = q.where(AggregatesRow.epoch == epoch) if epoch is not None else q.order_by(AggregatesRow.epoch.desc())
            row = s.scalars(q.limit(1)).first()
            return None if row is None else Aggregates.model_validate_json(row.aggregates)

    # ------------------------------------------------------------------ privacy

    def accountant(self, budget: float, window_epochs: int) -> BudgetAccountant:
        """The privacy accounts as last committed (the latest window's spend, the recent releases)."""
        with self.session() as s:
            window = s.scalar(select(func.max(SpentRow.window)))
            spent = {}
            if window is not None:
                spent = {r.node: r.spent for r in s.scalars(select(SpentRow).where(SpentRow.window == window))}
            recent = s.scalars(select(ReleaseRow).order_by(ReleaseRow.id.desc()).limit(RELEASES_KEPT))
            releases = [{"epoch": r.epoch, "figure": r.figure, "epsilon": r.epsilon, "nodes": r.nodes} for r in recent][
                ::-1
            ]
        return BudgetAccountant(budget, window_epochs, spent, window or 0, releases)

    def releases(self, epoch: int) -> list[tuple[str, float]]:
        with self.session() as s:
            rows = s.scalars(select(ReleaseRow).where(ReleaseRow.epoch == epoch).order_by(ReleaseRow.id))
            return [(r.figure, r.epsilon) for r in rows]


def _intent(row: SlashRow) -> SlashIntent:
    return SlashIntent(
        evidence_hash=row.evidence_hash,
        epoch=row.epoch,
        accused_node=row.accused_node,
        checker_node=row.checker_node,
        operator=row.operator,
        reporter=row.reporter,
        amount=int(row.amount),
    )


def _epoch_intent(row: EpochRow) -> EpochIntent:
    contributions = CONTRIBUTIONS.validate_json(row.contributions)
    return EpochIntent(EpochRecord.model_validate_json(row.record), contributions)
