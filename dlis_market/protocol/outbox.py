"""A persisted outbox: messages to another process survive its outage and a restart of the sender.

One row per message (kind, idempotency key, body bytes, attempts, next attempt time, last error)
in a real database (a SQLite file by default; any SQLAlchemy URL), committed before the first
delivery attempt. Each kind has one receiver (:meth:`Outbox.register`: an async function that
delivers a body and says what the receiver answered, :class:`Answer`). Rows of a kind go out in the
order they were queued (telemetry sequence numbers must arrive in order); when the receiver cannot
take one now (unreachable, 408, 429, 5xx) the kind waits with capped exponential backoff
(``retry_base_s * 2**(attempts-1)``, at most ``retry_max_s``) on that row. A row is deleted only
once the receiver took it (2xx) or says it already has it (its own dedup answer: the effect
happens exactly once although the body may travel twice after a crash between delivery and
delete). A definitive refusal (any other 4xx) keeps the row as a dead letter with the reason:
visible (:meth:`Outbox.dead_letters`), never retried, removed by :meth:`Outbox.purge_dead`.

Bounded: at most ``max_rows`` rows and ``max_bytes`` body bytes, dead letters included; a full
outbox refuses new messages with :class:`OutboxFullError`. A kind registered with
``keep_latest=n`` keeps only its newest ``n`` rows (periodic reports, where a newer one supersedes
the older). The same (kind, key) queued twice is one row. SQL runs in a worker thread
(:func:`asyncio.to_thread`), never on the event loop.

Use: ``box = Outbox(url); box.register("evidence", HttpReceiver(...)); box.start()``, then
``await box.send("evidence", key, body)`` (persist, then one immediate try; later tries run in the
background loop), and ``await box.close()``.

Why one module of this size: the row schema, the per-kind delivery loop and the classification of
answers are one rule ("a row leaves only when its receiver took it or already had it"); split
across files, that rule would have no single place to read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Index, LargeBinary, String, Text, UniqueConstraint, delete, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from dlis_market.db import open_engine
from dlis_market.errors import DlisError
from dlis_market.settings import OutboxSettings

log = logging.getLogger(__name__)

MAX_KEY_CHARS = 200
MAX_KIND_CHARS = 64
MAX_ERROR_CHARS = 500


class OutboxError(DlisError):
    """The outbox refused a message or an operation."""


class OutboxFullError(OutboxError):
    """The outbox holds its maximum rows or bytes: the receiver has been down long enough to fill it."""


class Verdict(StrEnum):
    """What a receiver's answer means for the row."""

    DELIVERED = "delivered"  # taken (2xx): delete the row
    DUPLICATE = "duplicate"  # the receiver already has it (its dedup answer): delete the row
    REFUSED = "refused"  # definitive refusal (4xx other than 408/429): keep as a dead letter
    RETRY = "retry"  # unreachable, 408, 429, 5xx: try again after a backoff


@dataclass(frozen=True)
class Answer:
    verdict: Verdict
    detail: str = ""
    body: Mapping[str, Any] = field(default_factory=dict)
    status: int | None = None  # the HTTP status, when the receiver speaks HTTP


def classify_http(status: int, reason: str | None = None, duplicate_reasons: Collection[str] = ()) -> Verdict:
    """The verdict of an HTTP answer: ``reason`` (the problem JSON's ``reason`` member) in
    ``duplicate_reasons`` means the receiver already has the message. Pure."""
    if reason is not None and reason in duplicate_reasons:
        return Verdict.DUPLICATE
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status in (408, 429) or status >= 500 or status < 200:
        return Verdict.RETRY
    if 400 <= status < 500:
        return Verdict.REFUSED
    return Verdict.RETRY  # 3xx: a misconfigured URL or proxy; fixable without losing the message


Deliver = Callable[[bytes], Awaitable[Answer]]
OnAnswer = Callable[["Message", Answer], object]


class State(StrEnum):
    PENDING = "pending"
    DEAD = "dead"


class DeliveryStatus(StrEnum):
    """What :meth:`Outbox.send` achieved for a message right away."""

    DELIVERED = "delivered"
    DUPLICATE = "duplicate"  # delivered before (the receiver or this outbox knew it)
    DEAD = "dead"  # refused for good: never sent again
    QUEUED = "queued"  # not yet: the loop delivers it later


class _Base(DeclarativeBase):
    pass


class _Row(_Base):
    __tablename__ = "outbox_messages"
    __table_args__ = (
        UniqueConstraint("kind", "key", name="uq_outbox_kind_key"),
        Index("ix_outbox_kind_state_id", "kind", "state", "id"),
        Index("ix_outbox_state_size", "state", "size"),  # the size bound is summed from this index alone
    )

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(MAX_KIND_CHARS))
    key: Mapped[str] = mapped_column(String(MAX_KEY_CHARS))
    size: Mapped[int] = mapped_column()
    state: Mapped[str] = mapped_column(String(8), default=State.PENDING)
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[float] = mapped_column()
    next_attempt_at: Mapped[float] = mapped_column()
    last_error: Mapped[str] = mapped_column(Text, default="")
    body: Mapped[bytes] = mapped_column(LargeBinary)  # last: reading the other columns skips it


@dataclass(frozen=True)
class Message:
    id: int
    kind: str
    key: str
    body: bytes
    state: State
    attempts: int
    created_at: float
    next_attempt_at: float
    last_error: str

    @classmethod
    def of(cls, row: _Row) -> Message:
        return cls(row.id, row.kind, row.key, row.body, State(row.state), row.attempts, row.created_at,
                   row.next_attempt_at, row.last_error)  # fmt: skip


@dataclass(frozen=True)
class Delivery:
    """What :meth:`Outbox.send` achieved right away: ``queued`` rows go out later from the loop."""

    kind: str
    key: str
    status: DeliveryStatus
    answer: Answer | None = None

    @property
    def done(self) -> bool:
        return self.status in (DeliveryStatus.DELIVERED, DeliveryStatus.DUPLICATE)


@dataclass(frozen=True)
class _Route:
    deliver: Deliver
    keep_latest: int | None
    on_answer: OnAnswer | None


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of an outbox file (its folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class Outbox:
    def __init__(
        self,
        url: str,
        *,
        max_rows: int = 10_000,
        max_bytes: int = 256 << 20,
        retry_base_s: float = 1.0,
        retry_max_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_rows < 1 or max_bytes < 1 or retry_base_s <= 0 or retry_max_s < retry_base_s:
            raise OutboxError(
                f"outbox limits must be positive with retry_max_s >= retry_base_s; got max_rows={max_rows}, "
                f"max_bytes={max_bytes}, retry_base_s={retry_base_s}, retry_max_s={retry_max_s}"
            )
        self.url = url
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.clock = clock
        self.engine: Engine = open_engine(url)  # synchronous=FULL: a queued message is on disk when put() returns
        _Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._routes: dict[str, _Route] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._wake: asyncio.Event | None = None  # made by run(), in the loop it runs on
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None

    @classmethod
    def from_settings(cls, url: str, cfg: OutboxSettings) -> Outbox:
        """An outbox at ``url`` with the limits and retry timings of ``settings.outbox``."""
        return cls(url, max_rows=cfg.max_rows, max_bytes=cfg.max_bytes, retry_base_s=cfg.retry_base_s,
                   retry_max_s=max(cfg.retry_max_s, cfg.retry_base_s))  # fmt: skip

    # ------------------------------------------------------------------ configuration

    def register(
        self, kind: str, deliver: Deliver, *, keep_latest: int | None = None, on_answer: OnAnswer | None = None
    ) -> None:
        """``deliver`` takes the rows of ``kind``; ``on_answer`` hears every final answer (also
        of rows queued by an earlier process); ``keep_latest``: keep only the newest n rows."""
        if not 0 < len(kind) <= MAX_KIND_CHARS:
            raise OutboxError(f"an outbox kind has 1 to {MAX_KIND_CHARS} characters, got {len(kind)}")
        if keep_latest is not None and keep_latest < 1:
            raise OutboxError(f"keep_latest must be at least 1, got {keep_latest}")
        self._routes[kind] = _Route(deliver, keep_latest, on_answer)
        self._locks.setdefault(kind, asyncio.Lock())

    def _route(self, kind: str) -> _Route:
        route = self._routes.get(kind)
        if route is None:
            raise OutboxError(f"no receiver registered for outbox kind {kind!r}: call register({kind!r}, ...) first")
        return route

    def backoff_s(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed tries: capped exponential."""
        return float(min(self.retry_max_s, self.retry_base_s * 2 ** max(0, min(attempts - 1, 62))))

    # ------------------------------------------------------------------ queueing (sync, in a thread)

    def _put(self, kind: str, key: str, body: bytes, keep_latest: int | None) -> bool:
        try:
            return self._insert(kind, key, body, keep_latest)
        except IntegrityError:  # another process queued the same key in between: one row
            return False

    def _insert(self, kind: str, key: str, body: bytes, keep_latest: int | None) -> bool:
        with self._sessions.begin() as s:
            if s.scalar(select(_Row.id).where(_Row.kind == kind, _Row.key == key)) is not None:
                return False
            if keep_latest is not None:  # make room first: superseded rows do not count against the limit
                self._trim(s, kind, keep_latest - 1)
            rows, size = s.execute(select(func.count(_Row.id), func.coalesce(func.sum(_Row.size), 0))).one()
            if rows + 1 > self.max_rows or size + len(body) > self.max_bytes:
                dead = s.scalar(select(func.count(_Row.id)).where(_Row.state == State.DEAD)) or 0
                raise OutboxFullError(
                    f"outbox {self.url} is full: {rows} messages of {size} bytes ({dead} dead letters) held, limits "
                    f"{self.max_rows} messages and {self.max_bytes} bytes; this {kind} message of {len(body)} bytes "
                    "is not queued. Bring the receiver back (pending rows then drain), purge dead letters, or raise "
                    "the limits (outbox settings)"
                )
            now = self.clock()
            s.add(_Row(kind=kind, key=key, body=body, size=len(body), state=State.PENDING, attempts=0,
                       created_at=now, next_attempt_at=now, last_error=""))  # fmt: skip
        return True

    @staticmethod
    def _trim(s: Session, kind: str, keep: int) -> None:
        newest = select(_Row.id).where(_Row.kind == kind).order_by(_Row.id.desc()).limit(keep)
        s.execute(delete(_Row).where(_Row.kind == kind, _Row.id.not_in(newest)))

    def _head(self, kind: str) -> _Row | None:
        with self._sessions() as s:
            return s.scalar(
                select(_Row).where(_Row.kind == kind, _Row.state == State.PENDING).order_by(_Row.id).limit(1)
            )

    def _settle(self, row_id: int, answer: Answer) -> None:
        """Record an answer: delete, dead-letter, or schedule the next try."""
        with self._sessions.begin() as s:
            row = s.get(_Row, row_id)
            if row is None:  # trimmed (superseded) while in flight
                return
            if answer.verdict in (Verdict.DELIVERED, Verdict.DUPLICATE):
                s.delete(row)
                return
            row.attempts += 1
            row.last_error = answer.detail[:MAX_ERROR_CHARS]
            if answer.verdict is Verdict.REFUSED:
                row.state = State.DEAD
            else:
                row.next_attempt_at = self.clock() + self.backoff_s(row.attempts)

    def _find(self, kind: str, key: str) -> Message | None:
        with self._sessions() as s:
            row = s.scalar(select(_Row).where(_Row.kind == kind, _Row.key == key))
            return None if row is None else Message.of(row)

    def _list(self, state: State, kind: str | None) -> list[Message]:
        with self._sessions() as s:
            q = select(_Row).where(_Row.state == state).order_by(_Row.id)
            if kind is not None:
                q = q.where(_Row.kind == kind)
            return [Message.of(r) for r in s.scalars(q)]

    def _purge(self, kind: str | None) -> int:
        with self._sessions.begin() as s:
            q = delete(_Row).where(_Row.state == State.DEAD)
            if kind is not None:
                q = q.where(_Row.kind == kind)
            return int(s.execute(q).rowcount)  # type: ignore[attr-defined]

    def _next_due(self) -> float | None:
        with self._sessions() as s:
            heads = (
                select(func.min(_Row.id))
                .where(_Row.state == State.PENDING, _Row.kind.in_(list(self._routes)))
                .group_by(_Row.kind)
            )
            return s.scalar(select(func.min(_Row.next_attempt_at)).where(_Row.id.in_(heads)))

    # ------------------------------------------------------------------ async API

    async def put(self, kind: str, key: str, body: bytes) -> bool:
        """Persist one message (committed when this returns); False when (kind, key) is already
        queued or dead. Raises :class:`OutboxFullError` when full."""
        route = self._route(kind)
        if not 0 < len(key) <= MAX_KEY_CHARS:
            raise OutboxError(f"an outbox key has 1 to {MAX_KEY_CHARS} characters, got {len(key)}")
        new = await asyncio.to_thread(self._put, kind, key, bytes(body), route.keep_latest)
        if self._wake is not None:
            self._wake.set()
        return new

    async def send(self, kind: str, key: str, body: bytes) -> Delivery:
        """:meth:`put`, then deliver what is due of ``kind`` now (oldest first); what happened to
        this message right away (``queued``: the loop delivers it later)."""
        route = self._route(kind)
        async with self._locks[kind]:  # the loop cannot take this row between the put and the try
            if not await self.put(kind, key, body):
                known = await asyncio.to_thread(self._find, kind, key)
                if known is None:  # queued before and already delivered (by the loop or another send)
                    return Delivery(kind, key, DeliveryStatus.DUPLICATE, Answer(Verdict.DUPLICATE, "already delivered"))
                if known.state is State.DEAD:  # refused for good before: not sent again
                    return Delivery(kind, key, DeliveryStatus.DEAD, Answer(Verdict.REFUSED, known.last_error))
            answers = await self._deliver_due(kind, route)
        for message, answer in answers:
            if message.key == key:
                status = {Verdict.DELIVERED: DeliveryStatus.DELIVERED, Verdict.DUPLICATE: DeliveryStatus.DUPLICATE,
                          Verdict.REFUSED: DeliveryStatus.DEAD}.get(answer.verdict, DeliveryStatus.QUEUED)  # fmt: skip
                return Delivery(kind, key, status, answer)
        return Delivery(kind, key, DeliveryStatus.QUEUED)

    async def deliver_kind(self, kind: str) -> list[tuple[Message, Answer]]:
        """Deliver the due rows of ``kind`` in order until the receiver cannot take one; the answers."""
        route = self._route(kind)
        async with self._locks[kind]:
            return await self._deliver_due(kind, route)

    async def _deliver_due(self, kind: str, route: _Route) -> list[tuple[Message, Answer]]:
        out: list[tuple[Message, Answer]] = []
        while True:
            row = await asyncio.to_thread(self._head, kind)
            if row is None or row.next_attempt_at > self.clock():
                return out
            message = Message.of(row)
            try:
                answer = await route.deliver(message.body)
            except (OSError, TimeoutError) as exc:  # the receiver is unreachable: retry later
                answer = Answer(Verdict.RETRY, f"unreachable: {exc!r}")
            await asyncio.to_thread(self._settle, message.id, answer)
            out.append((message, answer))
            if answer.verdict is Verdict.REFUSED:  # the sender's on_answer says what it means
                log.info("outbox: %s %s refused for good (kept as a dead letter): %s",
                         kind, message.key, answer.detail)  # fmt: skip
            elif answer.verdict is Verdict.RETRY:
                log.info("outbox: %s %s not delivered (try %d): %s; next try in %.1f s", kind, message.key,
                         message.attempts + 1, answer.detail, self.backoff_s(message.attempts + 1))  # fmt: skip
                return out
            if route.on_answer is not None:
                route.on_answer(message, answer)

    async def flush(self) -> int:
        """One pass over every registered kind; how many rows left the outbox (delivered or duplicate)."""
        done = 0
        for kind in list(self._routes):
            answers = await self.deliver_kind(kind)
            done += sum(a.verdict in (Verdict.DELIVERED, Verdict.DUPLICATE) for _, a in answers)
        return done

    async def pending(self, kind: str | None = None) -> list[Message]:
        return await asyncio.to_thread(self._list, State.PENDING, kind)

    async def dead_letters(self, kind: str | None = None) -> list[Message]:
        return await asyncio.to_thread(self._list, State.DEAD, kind)

    async def purge_dead(self, kind: str | None = None) -> int:
        """Delete dead letters (after reading them); how many."""
        return await asyncio.to_thread(self._purge, kind)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop``: wakes when a message is queued or the next backoff ends."""
        wake = self._wake = asyncio.Event()
        while not stop.is_set():
            wake.clear()
            await self.flush()
            due = await asyncio.to_thread(self._next_due)
            delay = self.retry_max_s if due is None else max(0.0, due - self.clock())
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
            try:
                await asyncio.wait(waits, timeout=max(0.01, delay), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    def start(self) -> None:
        """Run the delivery loop in the background (once); :meth:`close` stops it."""
        if self._task is None:
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._run_logged(self._stop))

    async def _run_logged(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run(stop)
            except Exception:  # a database hiccup must not end delivery for the process's life (logged)
                log.exception("outbox delivery loop failed; restarting it in %.1f s", self.retry_base_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.retry_base_s)

    async def close(self) -> None:
        """Stop the loop (rows not yet delivered stay on disk for the next process) and the engine."""
        if self._task is not None and self._stop is not None:
            self._stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.engine.dispose()
