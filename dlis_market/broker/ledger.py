"""The broker's ledger: jobs, authorizations, receipts and settlement batches in a real database.

SQLite by default (a file under ``$DLIS_HOME``); any SQLAlchemy URL works. The tables and the
uint256 column type are :mod:`.ledger_schema` (re-exported here). A job's completion and its
receipts are written in one transaction, and a batch row is committed before its transaction is sent, so a crash at any
point loses no receipt and can never pay a job twice (JobMarket refuses a used nonce or batch id).

Several broker processes may share one PostgreSQL ledger (:mod:`.cluster`): each job names the
process that runs it (``owner``, a heartbeating instance), an admission's open-jobs read and job
write hold a per-client transaction lock, and the settle epoch lives in the database, so what one
process guarantees alone holds across all of them. On SQLite (one process) none of that applies.

Why one module of this size: every transaction over the ledger's tables (admit, record a job with
its receipts, reclaim after a crash, open and close a batch, the group commit, API keys and
idempotency keys) is a method of one :class:`Ledger` that holds the engine, the shared-ledger
locks and the settle epoch, so what "one transaction" covers is read in one place; the service and
the settler only call these methods. The tables are in :mod:`.ledger_schema`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeVar, cast

from eth_utils import keccak
from sqlalchemy import Table, bindparam, delete, func, insert, inspect, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dlis_market.broker.ledger_schema import (
    ApiKeyRequestRow,
    ApiKeyRow,
    Base,
    BatchRow,
    BatchStatus,
    CounterRow,
    IdempotencyRow,
    InstanceRow,
    JobRow,
    JobStatus,
    LedgerError,
    NewJob,
    ReceiptRow,
)
from dlis_market.db import open_engine
from dlis_market.protocol.pricing import fee_on
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.settings import Settings

T = TypeVar("T")
# PostgreSQL advisory lock namespaces (the first key of the two-key form) of a shared ledger.
LOCK_SCHEMA = 1  # creating the tables
LOCK_CLIENT = 2  # one client's admissions (second key: hashtext of its address)
LOCK_SETTLER = 3  # the one settling process (second key: hashtext of the broker address)
SETTLE_EPOCH = "settle_epoch"
# Statuses whose jobs still hold escrow: max cost while queued or running, cost + fee once completed.
OPEN_STATUSES = ("queued", "running", "completed")
# The hot path's statements (admission's open-jobs read and job insert, a job's completion) run
# as Core statements built once: through the session's unit of work they cost the broker ~1.2 ms
# of CPU per job more (measured over 4,000 jobs, 8 per transaction).
JOBS = cast(Table, JobRow.__table__)
RECEIPTS = cast(Table, ReceiptRow.__table__)
_STATUS = select(JOBS.c.status).where(JOBS.c.id == bindparam("job_id"))
_OPEN_JOBS = select(JOBS.c.status, JOBS.c.max_cost, JOBS.c.cost, JOBS.c.fee).where(
    JOBS.c.client == bindparam("client"), JOBS.c.status.in_(OPEN_STATUSES)
)
_ROW = select(JOBS).where(JOBS.c.id == bindparam("job_id"))
_COMPLETE_OPEN = update(JOBS).where(
    JOBS.c.id == bindparam("job_id"), JOBS.c.status.in_((JobStatus.QUEUED, JobStatus.RUNNING))
)
_COMPLETE = _COMPLETE_OPEN.returning(*JOBS.c)


def db_now(s: Session) -> float:
    """The database's clock in epoch seconds (PostgreSQL), so processes on several machines agree
    on heartbeat ages; this machine's clock elsewhere."""
    if s.get_bind().dialect.name == "postgresql":
        return float(s.scalar(text("SELECT extract(epoch FROM clock_timestamp())::float8")) or 0.0)
    return time.time()


def _with_receipts(rows: Iterable[JobRow]) -> list[JobRow]:
    """The jobs with their receipts loaded, so they can be read after their session closes."""
    out = list(rows)
    for r in out:
        _ = r.receipts
    return out


def batch_id_for(job_ids: Sequence[str]) -> str:
    """Deterministic batch id: the same jobs always form the same batch id."""
    return "0x" + keccak(b"".join(bytes.fromhex(j[2:]) for j in sorted(job_ids))).hex()


def database_url(settings: Settings) -> str:
    """The broker's ledger database: ``broker.database_url``, else a SQLite file in its home."""
    return settings.broker.database_url or f"sqlite:///{settings.home / 'broker.db'}"


class Ledger:
    """The broker's books. Every write commits before it returns (SQLite: WAL, ``synchronous=FULL``,
    so a job admitted or completed survives a crash of the process or the machine). Writes of
    concurrent requests can share one transaction, hence one sync (:meth:`transact`)."""

    def __init__(self, url: str, instance: str | None = None):
        self.url = url
        self.engine: Engine = open_engine(url, foreign_keys=True)
        # PostgreSQL: several broker processes may write it at once (see the module docstring).
        self.shared = self.engine.dialect.name == "postgresql"
        self.instance = instance or uuid.uuid4().hex  # this process, as jobs' ``owner``
        self._create_schema()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Bumped before and after each batch's settled status is committed: an escrow balance read
        # on chain while it was unchanged is consistent with the open jobs read now (see
        # BrokerService._commit); one read across a settlement may count a settled job twice free.
        # On a shared ledger the epoch is a database counter instead (:meth:`epoch`).
        self.settle_epoch = 0

    def _create_schema(self) -> None:
        """Create the tables (one process at a time on PostgreSQL: concurrent CREATEs collide) and
        add ``jobs.owner`` to a ledger made before it existed."""
        with self.engine.begin() as conn:
            if self.shared:
                conn.execute(text("SELECT pg_advisory_xact_lock(:ns, 0)"), {"ns": LOCK_SCHEMA})
            Base.metadata.create_all(conn)
            if "owner" not in {c["name"] for c in inspect(conn).get_columns("jobs")}:
                conn.execute(text("ALTER TABLE jobs ADD COLUMN owner VARCHAR(64)"))
            if conn.execute(select(CounterRow).where(CounterRow.name == SETTLE_EPOCH)).first() is None:
                conn.execute(insert(CounterRow).values(name=SETTLE_EPOCH, value=0))

    def lock_client(self, s: Session, client: str) -> None:
        """Serialize ``client``'s admissions across processes until ``s`` commits (a PostgreSQL
        transaction-level advisory lock); nothing on SQLite, whose one process serializes them."""
        if self.shared:
            s.execute(text("SELECT pg_advisory_xact_lock(:ns, hashtext(:c))"), {"ns": LOCK_CLIENT, "c": client.lower()})

    def epoch(self) -> int:
        """The settle epoch now: :attr:`settle_epoch`, or on a shared ledger the database's counter
        (bumped in the transaction that marks a batch settled, by whichever process settled it)."""
        if not self.shared:
            return self.settle_epoch
        with self.session() as s:
            return self.epoch_in(s)

    def epoch_in(self, s: Session) -> int:
        """:meth:`epoch` in session ``s``."""
        if not self.shared:
            return self.settle_epoch
        return int(s.scalar(select(CounterRow.value).where(CounterRow.name == SETTLE_EPOCH)) or 0)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    def transact(self, ops: Sequence[Callable[[Session], T]]) -> list[T | Exception]:
        """Run ``ops`` in one transaction (one commit, one sync) and return each one's result.
        An op that raises gets its exception back and the others are run again, each in a
        transaction of its own (so one op's failure never commits a half of it or undoes another)."""
        try:
            with self.session() as s:
                return list(op(s) for op in ops)
        except Exception:  # one op failed: the batch was rolled back; each op alone, as if sent alone
            if len(ops) == 1:
                return [self._alone(ops[0])]
            return [self._alone(op) for op in ops]

    def _alone(self, op: Callable[[Session], T]) -> T | Exception:
        try:
            with self.session() as s:
                return op(s)
        except Exception as exc:  # returned to the op's caller, who raises it
            return exc

    # ------------------------------------------------------------------ jobs

    def create_job(self, job: NewJob) -> JobRow:
        with self.session() as s:
            return self.add_job(s, job)

    @staticmethod
    def add_job(s: Session, job: NewJob) -> JobRow:
        """Write a new job in session ``s`` (a :class:`LedgerError` when its id exists: the insert
        fails on the primary key, and ``s`` must be rolled back; admission looks the id up first).
        The row is inserted with one Core statement, not through the session's unit of work (the
        ORM's flush was most of admission's ledger cost); the returned row is not in ``s``."""
        taken = f"job {job.id} (client {job.client}, nonce {job.nonce}) already exists; use a new nonce"
        now = time.time()
        values: dict[str, Any] = {
            "id": job.id,
            "client": job.client,
            "nonce": job.nonce,
            "model": job.model,
            "model_id": job.model_id,
            "status": JobStatus.QUEUED if job.route is None else JobStatus.RUNNING,
            "request_json": json.dumps(job.request, sort_keys=True),
            "max_cost": job.max_cost,
            "deadline": job.deadline,
            "auth_signature": job.auth_signature,
            "route_json": None if job.route is None else json.dumps(job.route),
            "fallback": job.fallback,
            "owner": job.owner,
            "created_at": now,
            "updated_at": now,
            # the rest as a new job has them (the returned row holds every column)
            **dict.fromkeys(("answer", "token_ids_json", "cost", "fee", "ttft_ms", "latency_ms", "error", "batch_id")),
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }
        try:
            s.connection().execute(insert(JOBS), [values])
        except IntegrityError as exc:  # written by another process meanwhile
            raise LedgerError(taken) from exc
        return JobRow(**values, receipts=[])

    def get_job(self, job_id: str) -> JobRow | None:
        with self.session() as s:
            row = s.get(JobRow, job_id)
            return None if row is None else _with_receipts([row])[0]

    def recent_jobs(self, limit: int = 50) -> list[JobRow]:
        with self.session() as s:
            return _with_receipts(s.scalars(select(JobRow).order_by(JobRow.created_at.desc()).limit(limit)))

    def mark_running(self, job_id: str, route: Any, fallback: bool) -> None:
        with self.session() as s:
            row = self._job(s, job_id)
            row.status = JobStatus.RUNNING
            row.route_json = json.dumps(route)
            row.fallback = fallback

    def complete_job(self, job_id: str, **result: Any) -> JobRow:
        """Record the answer and every receipt atomically (:meth:`complete_in`)."""
        with self.session() as s:
            return self.complete_in(s, job_id, **result)

    @classmethod
    def complete_in(
        cls,
        s: Session,
        job_id: str,
        *,
        answer: str,
        token_ids: Sequence[int],
        prompt_tokens: int,
        receipts: Sequence[StageReceipt],
        cost: int,
        fee: int,
        ttft_ms: float,
        latency_ms: float,
        route: Any | None = None,
        note: str | None = None,
    ) -> JobRow:
        """Record the answer and every receipt in session ``s`` (``note``: why it ended early, if
        it did). Returns the job as recorded, receipts loaded. A job that already ended (another
        process reclaimed and recorded it) is a :class:`LedgerError`: its receipts are written once."""
        changes: dict[str, Any] = {
            "status": JobStatus.COMPLETED,
            "error": note,
            "answer": answer,
            "token_ids_json": json.dumps(list(token_ids)),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(token_ids),
            "cost": cost,
            "fee": fee,
            "ttft_ms": ttft_ms,
            "latency_ms": latency_ms,
            "updated_at": time.time(),
        }
        if route is not None:
            changes["route_json"] = json.dumps(route)
        # Core statements, not the unit of work (see add_job). The status condition makes the
        # update the check: a peer process that recorded the job since wins, and this one writes
        # nothing (PostgreSQL re-reads the row's status once the peer's lock is gone).
        conn = s.connection()
        params = {"job_id": job_id, **changes}
        if conn.dialect.update_returning:
            recorded = conn.execute(_COMPLETE, params).mappings().first()
        else:  # SQLite before 3.35 has no RETURNING: the same conditional update, then the row
            done = conn.execute(_COMPLETE_OPEN, params).rowcount == 1
            recorded = conn.execute(_ROW, {"job_id": job_id}).mappings().first() if done else None
        if recorded is None:
            status = conn.execute(_STATUS, {"job_id": job_id}).scalar()
            if status is None:
                raise LedgerError(f"unknown job {job_id}")
            raise LedgerError(f"job {job_id} is {status} already; its answer and receipts were recorded before")
        # A queued or running job has no receipts yet (they are written here, once).
        written = [ReceiptRow.of(job_id, stage, r) for stage, r in enumerate(receipts)]
        if written:
            conn.execute(insert(RECEIPTS), [w.column_values() for w in written])
        return JobRow(**recorded, receipts=written)

    def fail_job(self, job_id: str, error: str) -> bool:
        """Fail a queued or running job (its escrow is released). False, and nothing changed, when
        it ended already (recorded meanwhile, e.g. by a peer process that reclaimed it)."""
        with self.session() as s:
            row = self._job(s, job_id)
            if row.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
                return False
            row.status = JobStatus.FAILED
            row.error = error
            row.batch_id = None
            return True

    def mark_unpayable(self, job_id: str, reason: str) -> None:
        """A completed job JobMarket will not pay: keep its receipts, record why (with evidence)."""
        with self.session() as s:
            row = self._job(s, job_id)
            row.status = JobStatus.UNPAYABLE
            row.error = reason
            row.batch_id = None

    def recover_interrupted(
        self, reason: str, stale_s: float = math.inf, restarted: bool = True
    ) -> tuple[list[str], list[str], list[str]]:
        """Jobs a previous process left queued or running (it stopped before they ended): those
        whose receipts were recorded become completed (the settler pays them); running ones with
        a route stay running (their stages may hold receipts for what they served: the caller
        reclaims them, then completes or fails the job); the rest fail with ``reason``, which
        releases their escrow commitment. Returns (completed, failed, to reclaim) ids.

        On a shared ledger only jobs of processes that stopped are taken: no owner, or an owner
        whose heartbeat is older than ``stale_s`` (database clock), and (``restarted``: this
        process just started, under an instance id it may have had before) this instance's own;
        each is taken by one process (rows locked, others skipped) and becomes this process's."""
        done: list[str] = []
        failed: list[str] = []
        reclaim: list[str] = []
        with self.session() as s:
            q = select(JobRow).where(JobRow.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
            if self.shared:
                stale = InstanceRow.heartbeat_at < db_now(s) - stale_s
                orphan = JobRow.owner.is_(None) | InstanceRow.id.is_(None) | stale
                if restarted:
                    orphan |= JobRow.owner == self.instance
                q = (
                    q.outerjoin(InstanceRow, InstanceRow.id == JobRow.owner)
                    .where(orphan)
                    .with_for_update(of=JobRow, skip_locked=True)
                )
            for row in s.scalars(q.order_by(JobRow.created_at)):
                row.owner = self.instance
                if row.receipts:
                    row.status = JobStatus.COMPLETED
                    done.append(row.id)
                elif row.status == JobStatus.RUNNING and json.loads(row.route_json or "[]"):
                    reclaim.append(row.id)
                else:
                    row.status, row.error, row.batch_id = JobStatus.FAILED, reason, None
                    failed.append(row.id)
        return done, failed, reclaim

    @staticmethod
    def _job(s: Session, job_id: str) -> JobRow:
        row = s.get(JobRow, job_id)
        if row is None:
            raise LedgerError(f"unknown job {job_id}")
        return row

    def committed_escrow(self, client: str) -> int:
        """Escrow already promised to this client's unsettled jobs (max cost while running)."""
        with self.session() as s:
            return self.committed_in(s, client)

    @staticmethod
    def committed_in(s: Session, client: str) -> int:
        """:meth:`committed_escrow` in session ``s`` (jobs it added or changed count too: what the
        session holds unwritten is flushed before the read)."""
        if s.new or s.dirty or s.deleted:
            s.flush()
        total = 0
        for status, max_cost, cost, fee in s.connection().execute(_OPEN_JOBS, {"client": client}):
            total += (cost or 0) + (fee or 0) if status == JobStatus.COMPLETED else max_cost
        return total

    @staticmethod
    def has_job(s: Session, job_id: str) -> bool:
        """Whether a job of this id is in the ledger (in session ``s``)."""
        return s.connection().execute(_STATUS, {"job_id": job_id}).first() is not None

    # ------------------------------------------------------------------ settlement

    def unsettled_jobs(self, limit: int, exclude: Sequence[str] = ()) -> list[JobRow]:
        """The oldest completed jobs in no batch, except ``exclude`` (jobs held back this pass)."""
        with self.session() as s:
            q = select(JobRow).where(JobRow.status == JobStatus.COMPLETED, JobRow.batch_id.is_(None))
            if exclude:
                q = q.where(JobRow.id.not_in(list(exclude)))
            return _with_receipts(s.scalars(q.order_by(JobRow.created_at).limit(limit)))

    def create_batch(self, job_ids: Sequence[str]) -> str:
        """Assign jobs to a new pending batch (committed before anything is sent)."""
        batch = batch_id_for(job_ids)
        with self.session() as s:
            existing = s.get(BatchRow, batch)
            if existing is None:
                s.add(BatchRow(id=batch, status=BatchStatus.PENDING))
            elif existing.status == BatchStatus.FAILED:  # never settled on chain, so the id is still free there
                existing.status, existing.error = BatchStatus.PENDING, None
            for jid in job_ids:
                self._job(s, jid).batch_id = batch
        return batch

    def open_batches(self) -> list[BatchRow]:
        with self.session() as s:
            pending = select(BatchRow).where(BatchRow.status == BatchStatus.PENDING)
            return list(s.scalars(pending.order_by(BatchRow.created_at)))

    def batch_jobs(self, batch_id: str) -> list[JobRow]:
        with self.session() as s:
            return _with_receipts(
                s.scalars(select(JobRow).where(JobRow.batch_id == batch_id).order_by(JobRow.created_at))
            )

    def note_attempt(self, batch_id: str) -> None:
        with self.session() as s:
            b = s.get(BatchRow, batch_id)
            if b is not None:
                b.attempts += 1

    def mark_batch_settled(self, batch_id: str, tx_hash: str | None, block: int | None) -> None:
        self.settle_epoch += 1
        try:
            with self.session() as s:
                b = s.get(BatchRow, batch_id)
                if b is None:
                    raise LedgerError(f"unknown batch {batch_id}")
                b.status, b.tx_hash, b.block = BatchStatus.SETTLED, tx_hash, block
                for row in s.scalars(select(JobRow).where(JobRow.batch_id == batch_id)):
                    row.status = JobStatus.SETTLED
                if self.shared:  # committed with the statuses: every process's admissions see both at once
                    s.execute(
                        update(CounterRow).where(CounterRow.name == SETTLE_EPOCH).values(value=CounterRow.value + 1)
                    )
        finally:
            self.settle_epoch += 1

    def note_forfeited(self, job_id: str, node: str, amount: int, fee_bps: int) -> None:
        """JobMarket forfeited one stage's receipt at settlement (its node was not routable): the
        job's cost and fee are what the client was actually charged; the note says why."""
        with self.session() as s:
            row = self._job(s, job_id)
            row.cost = max((row.cost or 0) - amount, 0)
            row.fee = fee_on(row.cost, fee_bps)
            note = f"receipt of node {node} ({amount} token units) forfeited at settlement: not routable"
            row.error = f"{row.error}; {note}" if row.error else note

    def release_batch(self, batch_id: str, error: str) -> None:
        """A batch that cannot settle as a whole: mark it failed and free its jobs for a new batch."""
        with self.session() as s:
            b = s.get(BatchRow, batch_id)
            if b is None:
                raise LedgerError(f"unknown batch {batch_id}")
            b.status, b.error = BatchStatus.FAILED, error
            for row in s.scalars(select(JobRow).where(JobRow.batch_id == batch_id)):
                row.batch_id = None

    def get_batch(self, batch_id: str) -> BatchRow | None:
        with self.session() as s:
            return s.get(BatchRow, batch_id)

    # ------------------------------------------------------------------ idempotency

    def remember_request(self, scope: str, key: str, body_hash: str, job_id: str, forget_before: float) -> None:
        """Record (or replace) the job a request key admitted; keys older than ``forget_before``
        are dropped (they are past the idempotency window), so the table stays small."""
        with self.session() as s:
            self.remember_in(s, scope, key, body_hash, job_id, forget_before)

    @staticmethod
    def remember_in(s: Session, scope: str, key: str, body_hash: str, job_id: str, forget_before: float) -> None:
        """:meth:`remember_request` in session ``s``."""
        s.execute(delete(IdempotencyRow).where(IdempotencyRow.created_at < forget_before))
        row = s.get(IdempotencyRow, (scope, key))
        if row is None:
            s.add(IdempotencyRow(scope=scope, key=key, body_hash=body_hash, job_id=job_id, created_at=time.time()))
        else:
            row.body_hash, row.job_id, row.created_at = body_hash, job_id, time.time()

    def recall_request(self, scope: str, key: str, since: float) -> IdempotencyRow | None:
        """The request recorded under this key after ``since`` (older ones are forgotten)."""
        with self.session() as s:
            row = s.get(IdempotencyRow, (scope, key))
            return row if row is not None and row.created_at >= since else None

    # ------------------------------------------------------------------ api keys

    def add_api_key(
        self, row: ApiKeyRow, request_digest: str | None = None, *, max_live: int | None = None, now: int = 0
    ) -> Literal["added", "replayed", "too-many"]:
        """Record a key, and with it the digest of the signed request it answers, in one
        transaction with the client's count of unexpired keys (at most ``max_live``). Nothing is
        written when the request was answered before or the client holds too many. Request
        digests older than a day are forgotten (their deadlines, at most minutes ahead, passed)."""
        try:
            with self.session() as s:
                self.lock_client(s, row.client)  # the count and the insert of one client, one at a time
                if max_live is not None:
                    live = select(func.count()).where(ApiKeyRow.client == row.client, ApiKeyRow.expires_at >= now)
                    if int(s.scalar(live) or 0) >= max_live:
                        return "too-many"
                if request_digest is not None:
                    if s.get(ApiKeyRequestRow, request_digest) is not None:
                        return "replayed"
                    s.execute(delete(ApiKeyRequestRow).where(ApiKeyRequestRow.created_at < time.time() - 86400))
                    s.add(ApiKeyRequestRow(digest=request_digest, client=row.client, created_at=time.time()))
                s.add(row)
        except IntegrityError:  # the same request answered by a concurrent call meanwhile
            return "replayed"
        return "added"

    def get_api_key(self, key_hash: str) -> ApiKeyRow | None:
        with self.session() as s:
            return s.get(ApiKeyRow, key_hash)

    def charge_api_key(self, key_hash: str, amount: int) -> None:
        with self.session() as s:
            row = s.get(ApiKeyRow, key_hash)
            if row is None:
                raise LedgerError("unknown API key")
            if row.spent + amount > row.cap:
                raise LedgerError(f"API key spending cap {row.cap} would be exceeded ({row.spent} + {amount})")
            row.spent += amount
