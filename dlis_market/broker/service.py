"""The broker's core: quote, admit, run and record paid jobs; settle them on chain in batches.

Admission order, cheapest first (nothing runs unless all pass; each refusal is a domain error of
:mod:`dlis_market.broker.errors`, which the API maps to a status): known model -> the client's
EIP-712 authorization is for this broker, model and chain, unexpired, not further ahead than
JobMarket settles, and signed by the client -> a retry with the same Idempotency-Key gets the
first job -> its nonce is unused -> the prompt is not empty and fits the context (tokenized in a
worker thread) -> a job slot is free, or frees within the admission wait (a bounded FIFO line;
:class:`Overloaded` past its bounds) -> a route over workers with free KV-cache slots satisfies
the policy (while every worker of some layer is busy the request waits for a job to end) -> the
authorization covers the quoted maximum -> free escrow covers it (escrow less a withdrawal
request the client can still carry out, less this broker's open jobs). Then the job is written to
the ledger and runs in the background; tokens stream to subscribers; at the end the stages' signed
receipts and the answer are recorded in one transaction, and the settler pays them on chain. A
job whose every requester disconnected is cancelled after a grace period (nothing is charged);
at start, jobs a previous process left unfinished are settled for what their stages served (from
the receipts the stages kept) or failed (:meth:`BrokerService.recover`).

Why one module of this size: admission, running, cancellation and restart share one piece of live
state (held job and worker slots, running tasks, their subscribers and the commit lock), which a
split would have to hand around through private attributes. The job vocabulary and the pure
checks live in :mod:`.job_types`; pricing in :mod:`dlis_market.protocol.pricing`; routing in
:mod:`.planning`; settlement in :mod:`.settlement`; errors in :mod:`.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from eth_account.signers.local import LocalAccount
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dlis_market.broker.admission import AdmissionQueue, Batcher, ChainReads, ChainSnapshot
from dlis_market.broker.auth import VerifiedAuthorization, verify_authorization
from dlis_market.broker.backend import (
    BackendJob,
    InferenceBackend,
    JobStream,
)
from dlis_market.broker.catalog import ModelCatalog, ServedModel
from dlis_market.broker.cluster import ClusterMember
from dlis_market.broker.detokenize import StreamDecoder
from dlis_market.broker.errors import (
    Overloaded,
    UpstreamFailed,
    authorization_too_low,
    bad_authorization,
    empty_prompt,
    idempotency_key_reused,
    insufficient_escrow,
    no_route,
    nonce_used,
    privacy_unsupported,
    prompt_bytes_too_long,
    proof_unsupported,
    unknown_job,
)
from dlis_market.broker.job_types import (
    AdmissionTicket,
    Idempotency,
    PlannedRoute,
    Planner,
    PricedJob,
    covering_receipts,
    covers,
)
from dlis_market.broker.ledger import JobRow, Ledger, LedgerError, NewJob
from dlis_market.broker.metrics import BrokerMetrics
from dlis_market.broker.planning import StandingLookup, share_partner
from dlis_market.broker.schemas import JobCreate, Policy, Quote
from dlis_market.broker.settlement import Settler
from dlis_market.broker.zk_onchain import ProofRecorder
from dlis_market.broker.zk_proofs import HeadProofs
from dlis_market.chain.job_market import JobMarket
from dlis_market.errors import BrokerError, DlisError
from dlis_market.inference.sampling import TokenLogprob
from dlis_market.inference.zk_stage import head_unsupported
from dlis_market.protocol.pricing import fee_on, route_bound
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import Replan, RouteHop, route_record
from dlis_market.protocol.spans import SpanRecord
from dlis_market.settings import Settings

log = logging.getLogger(__name__)

# A cancelled job's backend session gets this long to close and hand over its receipts.
CANCEL_FINISH_TIMEOUT_S = 30.0
INTERRUPTED = "interrupted: the broker stopped while the job ran"
# Prompts up to this size are tokenized on the event loop (tens of microseconds: less than the hop
# to a worker thread); longer ones in a worker thread.
INLINE_TOKENIZE_BYTES = 4096
# An admission's escrow read older than this when its job is written (it waited in line for a
# slot or a worker) is read again.
ESCROW_READ_MAX_AGE_S = 1.0
# At most this many finished jobs keep their token events in memory (each for at most
# ``live_events_retention_s``): memory stays flat at any job rate.
MAX_FINISHED_LIVE = 1024


@dataclass
class _Live:
    """Token events of a running job for streaming subscribers."""

    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    done: bool = False
    row: JobRow | None = None  # the job as recorded when it completed


def token_event(item: int | TokenLogprob, wants_logprobs: bool) -> tuple[int, dict[str, Any]]:
    """A backend's token (an id, or an id with its log probabilities) as a ``token`` event (its
    ``text`` is added by the caller); BrokerError when the job asked for log probabilities and the
    backend sent a bare id: it is refused, never answered without them."""
    if isinstance(item, TokenLogprob):
        top = [[t, v] for t, v in item.top]
        return item.token, {"type": "token", "token_id": item.token, "logprob": {"logprob": item.logprob, "top": top}}
    if wants_logprobs:
        raise BrokerError(
            f"the backend sent token {item} without the log probability the job asked for; its workers do not "
            "return log probabilities: leave logprobs out, or retry when workers that support them serve the model"
        )
    return item, {"type": "token", "token_id": item}


class _Stale:
    """An admission's escrow read may predate a settlement: read it again."""


STALE = _Stale()


def _give_back(counts: Counter[str], peers: list[str]) -> None:
    """Take one per listed peer off ``counts``, dropping the peers that reach zero."""
    counts.subtract(peers)
    for p in set(peers):
        if counts[p] <= 0:
            del counts[p]


class BrokerService:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        market: JobMarket,
        broker: LocalAccount,
        catalog: ModelCatalog,
        backend: InferenceBackend,
        planner: Planner,
        standing: StandingLookup | None = None,
    ):
        self.settings = settings
        self.standing = standing  # nodes' chain standing: a private job's share worker is replaced under it
        self.ledger = ledger
        self.market = market
        self.broker = broker
        self.catalog = catalog
        self.backend = backend
        self.planner = planner
        # Peer broker processes on a shared ledger; one settles at a time (no-op on SQLite).
        self.cluster = ClusterMember(ledger, broker.address, settings.broker.heartbeat_interval_s)
        self.settler = Settler(
            ledger, market, broker, max_batch=settings.broker.settle_max_batch, lease=self.cluster.is_settler
        )
        self._live: dict[str, _Live] = {}
        self._finished: deque[str] = deque()  # finished jobs whose events are kept, oldest first
        self.chain = ChainReads(market)
        self._writes: Batcher[Any, Any] = Batcher(ledger.transact)  # ledger writes, one commit per batch
        self._tasks: set[asyncio.Task[None]] = set()
        self._runs: dict[str, asyncio.Task[None]] = {}  # job id -> its running task
        self._watchers: dict[str, int] = {}  # job id -> requests waiting on it now
        self._orphaned: dict[str, asyncio.TimerHandle] = {}  # job id -> its pending cancellation
        self._end_reasons: dict[str, str] = {}  # job id -> why end_early ended it (for its ledger note)
        self._proofs = HeadProofs(settings)  # checks zk jobs' head proofs (broker/zk_proofs.py)
        self.proof_recorder: ProofRecorder | None = None  # records them on chain (zk.record_on_chain)
        b = settings.broker
        self.admission = AdmissionQueue(b.max_concurrent_jobs, b.admission_queue_max, b.admission_wait_s)
        self._reserved: Counter[str] = Counter()  # peer id -> KV slots planned for, session not yet open
        self._opened: Counter[str] = Counter()  # peer id -> sessions this broker opened there (ever)
        # peer id -> sessions of this broker's admitted jobs there (planned or open), until each job
        # ends: a worker holds at most its announced opener_slots of them (this broker's driver is one
        # opener for all its jobs)
        self._holding: Counter[str] = Counter()
        self._commit_lock = asyncio.Lock()  # the open-jobs read and the job write of one admission
        self._fee_bps: int | None = None
        self._auth_lifetime: int | None = None
        self._widest: dict[str, int] = {}
        self.metrics = BrokerMetrics()
        self.metrics.running.set_function(lambda: self.admission.running)
        self.metrics.waiting.set_function(lambda: self.admission.waiting)

    # ------------------------------------------------------------------ pricing

    async def fee_bps(self) -> int:
        if self._fee_bps is None:
            self._fee_bps = await asyncio.to_thread(self.market.fee_bps)
        return self._fee_bps

    async def plan(
        self, served: ServedModel, policy: Policy, prompt_tokens: int, max_tokens: int, deadline: float | None = None
    ) -> tuple[PlannedRoute, list[str]]:
        """A route over workers with a free KV-cache slot (less those this broker planned for and
        has not opened yet), and the peers it uses. While every worker of some layer is busy:
        with a ``deadline`` (an admitted request) wait for a job to end and plan again, else (or
        past it) :class:`Overloaded`."""
        while True:
            offers = await self.backend.offers(served.base)
            if not offers:
                raise no_route(f"no worker announces any layer of {served.name} ({served.num_layers} layers)")
            opened = self._opened.copy()
            mine = [o.model_copy(update={"free_slots": self._room(o)}) for o in offers]
            if covers([o for o in mine if o.free_slots > 0], served.num_layers) or not covers(
                offers, served.num_layers
            ):
                fee_bps = await self.fee_bps()
                route = await asyncio.to_thread(self.planner, mine, served, policy, prompt_tokens, max_tokens, fee_bps)
                free = {o.peer_id: o.free_slots for o in offers}
                share = {o.peer_id: o.opener_slots for o in offers if o.opener_slots > 0}  # 0: no such limit
                peers = [h.peer_id for h in route.hops]
                # Others may have planned on the same slots, or opened sessions the offers do not
                # show yet, while this plan ran in its thread.
                if all(
                    free.get(p, 1) - self._reserved[p] - (self._opened[p] - opened[p]) > 0
                    and (p not in share or self._holding[p] < share[p])
                    for p in peers
                ):
                    self._reserved.update(peers)
                    self._holding.update(peers)
                    return route, peers
            busy = sum(1 for o in mine if o.free_slots <= 0)
            if deadline is None or time.monotonic() >= deadline:
                raise Overloaded(
                    f"every worker of some layer of {served.name} is busy ({busy} of {len(offers)} have no free "
                    "KV-cache slot, or hold their share per opener of this broker's jobs)",
                    self.admission.retry_after(),
                )
            await self.admission.released(min(self.settings.broker.admission_poll_s, deadline - time.monotonic()))

    def _room(self, offer: SpanRecord) -> int:
        """Sessions this broker may still open on ``offer``'s worker: its free slots less the ones
        this broker planned for and has not opened, and at most what is left of the worker's share
        per opener (``opener_slots``) after this broker's jobs there."""
        room = offer.free_slots - self._reserved[offer.peer_id]
        if offer.opener_slots > 0:
            room = min(room, offer.opener_slots - self._holding[offer.peer_id])
        return room

    async def _bound(self, route: PlannedRoute, policy: Policy, prompt_tokens: int, max_tokens: int) -> tuple[int, int]:
        """Upper bound of the stages' charges and the protocol fee on them, within the policy."""
        bound = route_bound((h.price_per_token for h in route.hops), prompt_tokens + max_tokens, await self.fee_bps())
        if policy.max_cost is not None and bound.total > policy.max_cost:
            raise no_route(
                f"the cheapest route may cost {bound.total} token units, over the policy's max_cost {policy.max_cost}"
            )
        return bound.cost, bound.fee

    async def tokenize(
        self, served: ServedModel, prompt: str | None, messages: list[dict[str, str]] | None, max_tokens: int
    ) -> list[int]:
        """The prompt's token ids (in a worker thread: a long prompt must not stall the event loop),
        checked against the model's context (413) and for being empty (422). A text too long to fit
        the context whatever its tokens (no token spans more than the vocabulary's longest entry) is
        refused before it is tokenized at all."""
        texts = [prompt] if prompt is not None else [m["content"] for m in messages or []]
        size = sum(len(t.encode()) for t in texts)
        ctx = served.context_length
        if size > ctx and size > (widest := await self._widest_token(served)) * ctx:
            raise prompt_bytes_too_long(size, widest, ctx)
        if size <= INLINE_TOKENIZE_BYTES:
            ids = served.encode_prompt(prompt, messages)
        else:
            ids = await asyncio.to_thread(served.encode_prompt, prompt, messages)
        if not ids:
            raise empty_prompt()
        served.check_length(len(ids), max_tokens)
        return ids

    async def _widest_token(self, served: ServedModel) -> int:
        """Bytes of the longest vocabulary entry of the model's tokenizer (read once per model)."""
        widest = self._widest.get(served.name)
        if widest is None:
            tok = served.tokenizer

            def measure() -> int:
                # Decoded, so byte-level entries count their real bytes (an incomplete UTF-8 byte
                # decodes to U+FFFD, 3 bytes: an overestimate, which keeps the bound safe).
                ids = [[i] for i in range(len(tok))]
                return max(len(t.encode()) for t in tok.batch_decode(ids))

            widest = self._widest[served.name] = await asyncio.to_thread(measure)
        return widest

    async def price(
        self,
        model: str,
        prompt: str | None,
        messages: list[dict[str, str]] | None,
        max_tokens: int,
        policy: Policy,
        admit: bool = False,
    ) -> PricedJob:
        """Tokenize, check the context, route and bound the cost of a job (nothing is committed).
        ``admit``: hold a job slot for it (pass the result to :meth:`submit`, which releases it)."""
        served = self.catalog.get(model)
        if policy.privacy == "high":
            self._check_private(served)
        ids = await self.tokenize(served, prompt, messages, max_tokens)
        return await self._priced(served, ids, policy, max_tokens, admit)

    async def _priced(
        self, served: ServedModel, ids: list[int], policy: Policy, max_tokens: int, admit: bool = False
    ) -> PricedJob:
        """Route and bound a job. ``admit``: first take a job slot (waiting in line) and keep it
        and the route's worker slots in the returned ticket; released on any failure here."""
        if not admit:
            route, peers = await self.plan(served, policy, len(ids), max_tokens)
            self._unreserve(peers)
            self._unhold(peers)
            cost, fee = await self._bound(route, policy, len(ids), max_tokens)
            return PricedJob(served, ids, route, cost, fee)
        deadline = time.monotonic() + self.settings.broker.admission_wait_s
        try:
            await self.admission.acquire(deadline)
        except Overloaded:
            self.metrics.overloaded.inc()
            raise
        ticket = AdmissionTicket(peers=[])
        try:
            route, ticket.peers = await self.plan(served, policy, len(ids), max_tokens, deadline)
            ticket.holding = list(ticket.peers)
            cost, fee = await self._bound(route, policy, len(ids), max_tokens)
        except BaseException as exc:
            self._release(ticket)
            if isinstance(exc, Overloaded):
                self.metrics.overloaded.inc()
            raise
        return PricedJob(served, ids, route, cost, fee, ticket)

    def abandon(self, priced: PricedJob) -> None:
        """Give back the slots a priced job holds when it will not be submitted."""
        if priced.ticket is not None:
            self._release(priced.ticket)

    def _unreserve(self, peers: list[str]) -> None:
        _give_back(self._reserved, peers)

    def _unhold(self, peers: list[str]) -> None:
        _give_back(self._holding, peers)

    def _release(self, ticket: AdmissionTicket) -> None:
        """Give back what a ticket holds (each part once)."""
        self._unreserve(ticket.peers)
        ticket.peers = []
        self._unhold(ticket.holding)
        ticket.holding = []
        if ticket.slot_held:
            ticket.slot_held = False
            self.admission.release(time.monotonic() - ticket.since)

    async def quote(
        self, model: str, prompt: str | None, messages: list[dict[str, str]] | None, max_tokens: int, policy: Policy
    ) -> Quote:
        p = await self.price(model, prompt, messages, max_tokens, policy)
        return Quote(
            model=model,
            model_id=p.served.model_id,
            prompt_tokens=len(p.prompt_ids),
            max_tokens=max_tokens,
            route=route_record(p.route.hops),
            fallback=p.route.fallback,
            cost=p.cost,
            fee=p.fee,
            max_total=p.total,
            estimated_latency_ms=p.route.estimated_latency_ms,
            broker=self.broker.address,
            chain_id=self.market.client.chain_id,
            job_market=self.market.address,
            max_authorization_lifetime_s=await self._lifetime(),
        )

    async def _lifetime(self) -> int:
        if self._auth_lifetime is not None:
            return self._auth_lifetime
        return await asyncio.to_thread(self.max_authorization_lifetime)

    def max_authorization_lifetime(self) -> int:
        """JobMarket's bound on how far ahead an authorization's deadline may lie (read once)."""
        if self._auth_lifetime is None:
            self._auth_lifetime = self.market.max_authorization_lifetime()
        return self._auth_lifetime

    # ------------------------------------------------------------------ admission

    async def submit(
        self,
        req: JobCreate,
        spender: str | None = None,
        priced: PricedJob | None = None,
        idempotency: Idempotency | None = None,
    ) -> JobRow:
        """Admit and start a job. ``spender``: the authorization is signed by this key under the
        client's standing on-chain spending authorization (API-key clients) instead of the client.
        ``priced``: the :meth:`price` of this very request, when the caller already has it.
        ``idempotency``: a retry of a request already admitted under this key (scoped to the
        client, once its signature is checked) returns that job instead of a new one.

        Cheap checks come first: the signature, deadline and nonce are checked before the prompt is
        tokenized or a route searched, so a stranger's unsigned request costs almost nothing. Then
        the request takes a job slot, waiting in line when all are taken (429 past the queue's
        bounds), before it is routed; until then it holds no escrow."""
        held = [priced.ticket] if priced is not None and priced.ticket is not None else []
        try:
            row, run = await self._admit(req, spender, priced, idempotency, held)
        except BaseException:
            for t in held:
                self._release(t)
            raise
        if run is None:  # a retry of an admitted job
            for t in held:
                self._release(t)
            return row
        task = asyncio.create_task(run)  # a new job: its run owns the slot from here on
        self._tasks.add(task)
        self._runs[row.id] = task
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _t: self._runs.pop(row.id, None))
        task.add_done_callback(lambda _t: self._forget_later(row.id))
        for t in held:
            task.add_done_callback(functools.partial(self._released_by, t))
        return row

    def _forget_later(self, job_id: str) -> None:
        """Drop a finished job's token events after ``live_events_retention_s``, or sooner when
        more than :data:`MAX_FINISHED_LIVE` finished jobs keep theirs (memory stays flat however
        many jobs run; later subscribers get the ledger's record)."""
        retention = self.settings.broker.live_events_retention_s
        asyncio.get_running_loop().call_later(retention, self._live.pop, job_id, None)
        self._finished.append(job_id)
        while len(self._finished) > MAX_FINISHED_LIVE:
            self._live.pop(self._finished.popleft(), None)

    def finished_row(self, job_id: str) -> JobRow | None:
        """The job as recorded when it completed, while its events are kept (else None: read the
        ledger)."""
        live = self._live.get(job_id)
        return live.row if live is not None and live.done else None

    def _released_by(self, ticket: AdmissionTicket, _task: asyncio.Task[None]) -> None:
        self._release(ticket)

    async def _admit(
        self,
        req: JobCreate,
        spender: str | None,
        priced: PricedJob | None,
        idempotency: Idempotency | None,
        held: list[AdmissionTicket],
    ) -> tuple[JobRow, Coroutine[Any, Any, None] | None]:
        """The checks and the ledger write of :meth:`submit`: the job, and its run (None for a
        retry of a job already admitted). Tickets taken here are appended to ``held``."""
        served = priced.served if priced is not None else self.catalog.get(req.model)
        if req.proof is not None:
            self._check_provable(served)
        if req.policy.privacy == "high" and priced is None:  # price() checked it for a priced job
            self._check_private(served)
        given = req.authorization
        epoch = await self._epoch()  # before the escrow is read (see _commit)
        snap = await self.chain.admission(given.client, given.nonce, self.broker.address, spender)
        now = snap.timestamp
        vauth = verify_authorization(
            given,
            broker=self.broker.address,
            model_id=served.model_id,
            domain=self.market.domain(),
            now=now,
            max_lifetime=await self._lifetime(),
            signer=spender,
        )
        cap = None
        if spender is not None:
            cap = await self._check_spender(vauth.auth.client, snap, vauth.auth.max_cost, now)
        if idempotency is not None and idempotency.scope is None:
            idempotency = Idempotency(idempotency.key, idempotency.body_hash, vauth.auth.client, idempotency.replay)
        if (
            idempotency is not None
            and idempotency.replay
            and (prior := await self.admitted_before(idempotency)) is not None
        ):
            return prior, None
        # (a job of this id in the ledger is refused when it is written, in _commit)
        if snap.nonce_used:
            raise nonce_used(f"nonce {vauth.auth.nonce} of {vauth.auth.client} was used; sign a new one")
        if priced is None:
            messages = [m.model_dump() for m in req.messages] if req.messages is not None else None
            ids = await self.tokenize(served, req.prompt, messages, req.max_tokens)
            priced = await self._priced(served, ids, req.policy, req.max_tokens, admit=True)
            if priced.ticket is not None:
                held.append(priced.ticket)
        ids = priced.prompt_ids
        total = priced.total
        if total > vauth.auth.max_cost:
            raise authorization_too_low(total, vauth.auth.max_cost)
        new = NewJob(
            id=vauth.job_id,
            client=vauth.auth.client,
            nonce=vauth.auth.nonce,
            model=served.name,
            model_id=served.model_id,
            request=req.model_dump(mode="json", exclude={"authorization"}),
            max_cost=vauth.auth.max_cost,
            deadline=vauth.auth.deadline,
            auth_signature="0x" + vauth.signature.hex(),
            route=route_record(priced.route.hops),
            fallback=priced.route.fallback,
            owner=self.ledger.instance,
        )
        row = await self._commit(new, snap, epoch, now, cap, idempotency)
        self._live[row.id] = _Live()
        return row, self._run(row.id, served, vauth, req, ids, priced.route, priced.ticket)

    async def admitted_before(self, idem: Idempotency) -> JobRow | None:
        """The job a request with this key admitted within the idempotency window, if any; a
        refusal when the key was used for a different request."""
        if idem.scope is None:
            return None
        since = time.time() - self.settings.broker.idempotency_window_s
        prior = await asyncio.to_thread(self.ledger.recall_request, idem.scope, idem.key, since)
        if prior is None:
            return None
        if prior.body_hash != idem.body_hash:
            raise idempotency_key_reused(idem.key, self.settings.broker.idempotency_window_s)
        return await asyncio.to_thread(self.ledger.get_job, prior.job_id)

    # ------------------------------------------------------------------ requesters

    @contextlib.asynccontextmanager
    async def attached(self, job_id: str) -> AsyncIterator[None]:
        """A request waits on (or streams) a job. When the last one leaves before the job ends (the
        client disconnected), the job is cancelled after ``cancel_grace_s`` unless a retry attaches."""
        self._watchers[job_id] = self._watchers.get(job_id, 0) + 1
        pending = self._orphaned.pop(job_id, None)
        if pending is not None:
            pending.cancel()
        try:
            yield
        finally:
            left = self._watchers[job_id] - 1
            if left:
                self._watchers[job_id] = left
            else:
                del self._watchers[job_id]
                if job_id in self._runs:
                    loop = asyncio.get_running_loop()
                    grace = self.settings.broker.cancel_grace_s
                    self._orphaned[job_id] = loop.call_later(grace, self._cancel_orphan, job_id)

    def _cancel_orphan(self, job_id: str) -> None:
        self._orphaned.pop(job_id, None)
        task = self._runs.get(job_id)
        if task is not None and not self._watchers.get(job_id):
            log.info("job %s: every requester disconnected; cancelling it", job_id)
            task.cancel()

    def end_early(self, job_id: str, reason: str) -> None:
        """End a running job its requester needs no more of (a stop string was seen, a sibling
        job of its request was refused): settled for the tokens its stages served, nothing when
        none, with ``reason`` in its ledger note. The path of a job whose last requester left,
        taken at once; a requester still attached to the job (a retry) keeps it running."""
        if job_id in self._runs and not self._watchers.get(job_id):
            self._end_reasons[job_id] = reason
        self._cancel_orphan(job_id)

    async def _check_spender(self, client: str, snap: ChainSnapshot, need: int, now: int) -> int:
        """The API key's remaining on-chain spending cap, checked (early, cheaply) against this job
        and the broker's open jobs; :meth:`_commit` checks it again as it writes the job."""
        assert snap.spender is not None  # asked for with the spender
        remaining, expiry = snap.spender
        if expiry == 0:  # JobMarket keeps no entry: never authorized, or revoked
            raise bad_authorization(
                "the API key's spender is not authorized on chain: its client must send "
                "JobMarket.setSpender(spender, 0, cap, expiry) with the values the key was issued for "
                "(`dlis broker api-key` does it), or the client revoked it"
            )
        if expiry < now:
            raise bad_authorization(f"the API key's on-chain spending authorization expired at {expiry} (now {now})")
        free = remaining - await asyncio.to_thread(self.ledger.committed_escrow, client)
        if free < need:
            raise insufficient_escrow(need, max(free, 0), client, self.broker.address)
        return int(remaining)

    @staticmethod
    def _usable(escrow: int, withdrawal: tuple[int, int, int], now: int) -> tuple[int, int]:
        """(escrow usable by jobs, withdrawing): the balance less a withdrawal request the client
        can still carry out (until it expires it may become ready before this job settles)."""
        pending, _ready_at, expires_at = withdrawal
        withdrawing = min(pending, escrow) if pending and expires_at >= now else 0
        return escrow - withdrawing, withdrawing

    async def _commit(
        self, new: NewJob, snap: ChainSnapshot, epoch: int, now: int, cap: int | None,
        idempotency: Idempotency | None,
    ) -> JobRow:  # fmt: skip
        """Write the job if free escrow (usable escrow less this broker's open jobs) and the API
        key's ``cap`` still cover its max cost. The open-jobs read and the job write are one step
        of one writer (concurrent admissions share its transaction, each seeing the ones before
        it; on a shared ledger, also under the client's lock across processes), so two jobs of one
        client cannot both count the same free escrow, whichever broker process admits them. An escrow read
        older than :data:`ESCROW_READ_MAX_AGE_S`, or from before a settlement the ledger recorded
        since (which moves jobs out of the open ones as it takes their cost from the escrow), is
        read again first."""
        escrow, withdrawal, read_at = snap.escrow, snap.withdrawal, snap.read_at
        while True:
            if time.monotonic() - read_at > ESCROW_READ_MAX_AGE_S:
                epoch = await self._epoch()
                escrow, withdrawal, read_at = await self.chain.escrow(new.client, self.broker.address)
            usable, withdrawing = self._usable(escrow, withdrawal, now)
            write = functools.partial(self._write_job, new, usable, withdrawing, cap, idempotency, epoch)
            try:
                result = await self._writes.submit(write)
            except LedgerError as exc:  # the job id was written by another process meanwhile
                raise nonce_used(str(exc)) from exc
            if isinstance(result, BrokerError):
                raise result
            if isinstance(result, JobRow):
                return result
            read_at = -math.inf  # STALE: a settlement was recorded since the escrow was read

    def _write_job(
        self, new: NewJob, usable: int, withdrawing: int, cap: int | None, idempotency: Idempotency | None,
        epoch: int, s: Session,
    ) -> JobRow | BrokerError | _Stale:  # fmt: skip
        """:meth:`_commit`'s step in the writer's session: the job, a refusal (nothing written), or
        STALE."""
        self.ledger.lock_client(s, new.client)  # until commit: a peer process's admission of this client waits
        if Ledger.has_job(s, new.id):
            return nonce_used(f"job {new.id} (client {new.client}, nonce {new.nonce}) already exists; use a new nonce")
        committed = Ledger.committed_in(s, new.client)
        if self.ledger.epoch_in(s) != epoch:  # read after the open jobs: see Ledger.settle_epoch
            return STALE
        if cap is not None and cap - committed < new.max_cost:
            return insufficient_escrow(new.max_cost, max(cap - committed, 0), new.client, self.broker.address)
        if usable - committed < new.max_cost:
            return insufficient_escrow(
                new.max_cost, max(usable - committed, 0), new.client, self.broker.address, withdrawing
            )
        row = Ledger.add_job(s, new)
        if idempotency is not None and idempotency.scope is not None:
            Ledger.remember_in(
                s, idempotency.scope, idempotency.key, idempotency.body_hash, row.id,
                forget_before=time.time() - self.settings.broker.idempotency_window_s,
            )  # fmt: skip
        return row

    # ------------------------------------------------------------------ running

    def _backend_job(
        self, job_id: str, served: ServedModel, vauth: VerifiedAuthorization, req: JobCreate, ids: list[int],
        route: PlannedRoute, fee_bps: int, ticket: AdmissionTicket | None = None,
    ) -> BackendJob:  # fmt: skip
        s = req.sampling
        limit = vauth.auth.max_cost if req.policy.max_cost is None else min(req.policy.max_cost, vauth.auth.max_cost)
        policy = req.policy.model_copy(update={"max_cost": limit})
        shares, hops = route.hops[: route.shares], route.hops[route.shares :]
        return BackendJob(
            job_id=bytes.fromhex(job_id[2:]),
            model=served.base,  # the workers' model; an adapter rides along and names the receipts
            adapter=served.adapter,
            prompt_ids=ids,
            max_new_tokens=req.max_tokens,
            max_cost=vauth.auth.max_cost,
            greedy=s.greedy,
            temperature=s.temperature,
            top_k=s.top_k or 0,
            top_p=s.top_p or 1.0,
            seed=s.seed or 0,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logit_bias=tuple(sorted((s.logit_bias or {}).items())),
            logprobs=s.logprobs,
            stop_token_ids=served.eos_token_ids,
            num_layers=served.num_layers,
            route=hops,
            fee_bps=fee_bps,
            replan=self._replanner(served, policy, len(ids), req.max_tokens, fee_bps, ticket),
            proof=req.proof,
            check_proof=self._proof_check(job_id, served) if req.proof is not None else None,
            private_shares=shares,
            private_shard_dir=served.shard_dir if shares else None,
            private_partner=self._share_partner(served) if shares and self.standing is not None else None,
        )

    def _share_partner(self, served: ServedModel) -> Callable[[RouteHop, frozenset[str], int], Awaitable[RouteHop]]:
        """Replaces a private job's failed share worker under the job's policy: another worker of
        the first stage, staked, reputed, attested, of another operator than the survivor, at most
        the failed one's price (so the job's bound holds)."""
        standing = self.standing
        assert standing is not None

        async def partner(survivor: RouteHop, avoid: frozenset[str], max_price: int) -> RouteHop:
            offers = [o for o in await self.backend.offers(served.base) if o.peer_id not in avoid]
            return await asyncio.to_thread(
                share_partner, offers, survivor, standing, self.settings.broker.min_reputation_bps, max_price
            )

        return partner

    def _check_private(self, served: ServedModel) -> None:
        """Refuse privacy=high for a model whose first stage this broker cannot run on shares
        (InvalidRequest): it needs that stage's weights here, and no adapter."""
        first = served.manifest.stages[0]
        if len(served.manifest.stages) == 1:
            raise privacy_unsupported(
                served.name, "its first stage is the whole model (one shard): publish it with a short first stage"
            )
        if served.adapter is not None:
            raise privacy_unsupported(served.name, "the private first stage does not apply LoRA adapters; use the base")
        if not (served.shard_dir / first.file.path).is_file():
            raise privacy_unsupported(
                served.name,
                f"this broker holds no weights of the first stage {first.layers} "
                f"({served.shard_dir / first.file.path}); put the model's first shard beside its manifest "
                "(`dlis model fetch`), or send privacy=low",
            )

    def _check_provable(self, served: ServedModel) -> None:
        """Refuse a proof for a model whose head cannot be proven here (InvalidRequest)."""
        why = head_unsupported(served.manifest, self.settings.zk.max_head_params)
        last = served.manifest.stages[-1]
        if why is None and not (served.shard_dir / last.file.path).is_file():
            why = f"this broker holds no weights of the last stage ({last.file.path}) to check proofs with"
        if why is not None:
            raise proof_unsupported(served.name, why)

    def _proof_check(self, job_id: str, served: ServedModel) -> Callable[..., Awaitable[None]]:
        """The backend's check of the last stage's proof before the answer is accepted: a refused
        proof fails the job (ZkProofRefusedError), so a completed zk job is a proven one."""

        async def check(receipt: StageReceipt, prompt: Sequence[int], generated: Sequence[int]) -> None:
            args = (served.shard_dir, receipt, self.market.domain(), len(prompt), list(generated))
            checked = await asyncio.to_thread(self._proofs.verify, *args)
            log.info("job %s: %s", job_id, checked.account, extra={"job_id": job_id})
            if self.proof_recorder is not None:  # zk.record_on_chain: queued, never failing the job
                try:
                    await self.proof_recorder.submit(receipt, checked.key, list(generated))
                except Exception as exc:  # a full outbox or its database: the job stands
                    log.warning("job %s: its proof is not queued for the chain: %s", job_id, exc,
                                extra={"job_id": job_id})  # fmt: skip

        return check

    def _replanner(
        self, served: ServedModel, policy: Policy, prompt_tokens: int, max_tokens: int, fee_bps: int,
        ticket: AdmissionTicket | None = None,
    ) -> Replan:  # fmt: skip
        """One router: a failover replans through this broker's scheduler, under the job's policy
        with the authorization's max cost. The route's healthy hops stay (their stages re-bill
        the replayed session, so JobMarket pays one receipt per range); only the failed ranges
        are chosen again, among offers that lie inside them, within what this broker may still
        open on each (:meth:`_room`). A worker it adds counts against its share per opener until
        the job's ``ticket`` is released at the job's end."""

        entry_end = served.manifest.stages[0].layers.end
        private = policy.privacy == "high"  # its route starts after the first stage, run on shares

        async def replan(route: Sequence[RouteHop], avoid: frozenset[str]) -> Sequence[RouteHop]:
            kept = {(h.peer_id, h.start, h.end) for h in route if h.peer_id not in avoid}
            gaps = [(h.start, h.end) for h in route if h.peer_id in avoid]
            offers = [
                o if (o.peer_id, o.start, o.end) in kept else o.model_copy(update={"free_slots": self._room(o)})
                for o in await self.backend.offers(served.base)
                if o.peer_id not in avoid
                and (
                    (o.peer_id, o.start, o.end) in kept
                    or any(a <= o.start and o.end <= b for a, b in gaps)
                    or (private and (o.start, o.end) == (0, entry_end))
                )
            ]
            if private:  # the planner prices a pair for the first stage, which is dropped: the job keeps
                # its own pair, whose slots this very job holds, so a full first stage does not block it
                entry = [o for o in offers if (o.start, o.end) == (0, entry_end)]
                offers = [o for o in offers if o not in entry]
                offers += [o.model_copy(update={"free_slots": max(o.free_slots, 1)}) for o in entry]
            planned = await asyncio.to_thread(self.planner, offers, served, policy, prompt_tokens, max_tokens, fee_bps)
            hops = planned.hops[planned.shares :]
            if ticket is not None:
                added = [h.peer_id for h in hops if (h.peer_id, h.start, h.end) not in kept]
                self._holding.update(added)
                ticket.holding += added
            return hops

        return replan

    async def _run(
        self,
        job_id: str,
        served: ServedModel,
        vauth: VerifiedAuthorization,
        req: JobCreate,
        ids: list[int],
        route: PlannedRoute,
        ticket: AdmissionTicket | None = None,
    ) -> None:
        """Run an admitted job in its slot (released by its task's done callback)."""
        live = self._live[job_id]
        started = time.perf_counter()
        ttft: float | None = None
        out: list[int] = []
        text = ""
        stream: JobStream | None = None
        recorded = False
        try:
            try:  # (the job was written as running on this route when it was admitted)
                job = self._backend_job(job_id, served, vauth, req, ids, route, await self.fee_bps(), ticket)
                stream = await self.backend.start(job)
            finally:  # the session is open (the workers count it now) or failed: the reservation ends
                if ticket is not None:
                    self._opened.update(ticket.peers)
                    self._unreserve(ticket.peers)
                    ticket.peers = []
            tokens = stream.tokens()
            decoder = StreamDecoder(served.decode)
            try:
                async for item in tokens:
                    token, event = token_event(item, job.logprobs is not None)
                    if ttft is None:
                        ttft = (time.perf_counter() - started) * 1000
                    out.append(token)
                    piece = decoder.push(token)
                    text += piece
                    await self._publish(live, {**event, "text": piece})
            finally:  # on cancellation too: the token stream stops now
                if isinstance(tokens, AsyncGenerator):
                    await tokens.aclose()
            if tail := decoder.flush():  # the answer ends inside a character: its replacement text
                text += tail
                await self._publish(live, {"type": "token", "token_id": None, "text": tail})
            # Every token was served: a requester leaving now cancels nothing (the stages are
            # owed for the work and their receipts are collected next).
            self._runs.pop(job_id, None)
            final_route, receipts = await stream.finish()
            await self._record(job_id, served, ids, out, text, final_route, receipts, ttft, started)
            recorded = True
            await self._publish(live, {"type": "done", "job_id": job_id}, done=True)
        except asyncio.CancelledError:
            # Every requester left (or the broker is stopping). Not re-raised: this task ends here.
            if not recorded:
                await self._cancelled(job_id, served, ids, out, text, stream, ttft, started)
            await self._publish(live, {"type": "done" if recorded else "error", "job_id": job_id}, done=True)
        except Exception as exc:  # any failure of the run is recorded on the job and streamed
            # one line per failed job, with its reason; the traceback only when debugging
            log.warning("job %s failed: %s: %s", job_id, type(exc).__name__, exc, extra={"job_id": job_id})
            log.debug("job %s failure traceback", job_id, exc_info=True)
            await asyncio.to_thread(self.ledger.fail_job, job_id, f"{type(exc).__name__}: {exc}")
            await self._observe(job_id)
            await self._publish(live, {"type": "error", "job_id": job_id, "detail": str(exc)}, done=True)

    async def _record(
        self,
        job_id: str,
        served: ServedModel,
        ids: list[int],
        out: list[int],
        text: str,
        final_route: list[RouteHop],
        receipts: list[StageReceipt],
        ttft: float | None,
        started: float,
        note: str | None = None,
    ) -> None:
        """Record the answer and the receipts of the final route (one transaction)."""
        covering = covering_receipts(receipts, served.num_layers)
        cost = sum(r.amount for r in covering)
        fee = fee_on(cost, await self.fee_bps())
        complete = functools.partial(
            Ledger.complete_in,
            job_id=job_id,
            answer=text,
            token_ids=out,
            prompt_tokens=len(ids),
            receipts=covering,
            cost=cost,
            fee=fee,
            ttft_ms=ttft or 0.0,
            latency_ms=(time.perf_counter() - started) * 1000,
            route=route_record(final_route),
            note=note,
        )
        row: JobRow = await self._writes.submit(complete)
        self.metrics.observe_job(row)
        if (live := self._live.get(job_id)) is not None:
            live.row = row

    async def _cancelled(
        self,
        job_id: str,
        served: ServedModel,
        ids: list[int],
        out: list[int],
        text: str,
        stream: JobStream | None,
        ttft: float | None,
        started: float,
    ) -> None:
        """A cancelled job: close its backend session and settle it for what the stages served
        (their receipts for the tokens so far), or release it when nothing complete was served."""
        why = self._end_reasons.pop(job_id, None) or "every requester disconnected (or the broker stopped)"
        reason = f"cancelled: {why} after {len(out)} tokens"
        log.info("job %s %s", job_id, reason)
        if stream is not None and out:
            try:
                async with asyncio.timeout(CANCEL_FINISH_TIMEOUT_S):
                    final_route, receipts = await stream.finish()
                await self._record(
                    job_id, served, ids, out, text, final_route, receipts, ttft, started,
                    note=reason + "; settled for what the stages served",
                )  # fmt: skip
                return
            except Exception as exc:  # no usable receipts for the partial work: the job is released
                reason += (
                    f"; no complete receipts for the partial work ({type(exc).__name__}: {exc}), nothing is charged"
                )
        else:
            reason += "; nothing is charged"
        await asyncio.to_thread(self.ledger.fail_job, job_id, reason)
        await self._observe(job_id)

    async def _observe(self, job_id: str) -> None:
        row = await asyncio.to_thread(self.ledger.get_job, job_id)
        if row is not None:
            self.metrics.observe_job(row)

    async def _publish(self, live: _Live, event: dict[str, Any], done: bool = False) -> None:
        async with live.changed:
            live.events.append(event)
            live.done = live.done or done
            live.changed.notify_all()

    async def events(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Every event of a job from the start (replayed), then live ones until it ends."""
        live = self._live.get(job_id)
        if live is None:
            row = await asyncio.to_thread(self.ledger.get_job, job_id)
            if row is None:
                raise unknown_job(job_id)
            yield {"type": "done" if row.status != "failed" else "error", "job_id": job_id, "detail": row.error}
            return
        sent = 0
        while True:
            async with live.changed:
                seen = sent
                await live.changed.wait_for(lambda: len(live.events) > seen or live.done)  # noqa: B023
                batch = live.events[sent:]
                finished = live.done
            for ev in batch:
                yield ev
            sent += len(batch)
            if finished and sent == len(live.events):
                return

    async def wait(self, job_id: str) -> None:
        async for _ in self.events(job_id):
            pass

    # ------------------------------------------------------------------ restart

    async def _epoch(self) -> int:
        """The ledger's settle epoch (a database read, off the event loop, on a shared ledger)."""
        return await asyncio.to_thread(self.ledger.epoch) if self.ledger.shared else self.ledger.settle_epoch

    async def recover(self) -> tuple[list[str], list[str]]:
        """At start, before any job is admitted: settle what a previous process finished; for a
        job it left running, claim the receipts its stages signed when the old process vanished
        and settle it for what they served; fail the rest (their max cost is no longer
        committed). Returns (completed, failed) ids.

        On a shared ledger this process first joins its peers (heartbeat, settler lease), and
        only the jobs of processes that stopped are taken; :meth:`settle_loop` takes those of a
        peer that dies later (:meth:`adopt_orphans`)."""
        await asyncio.to_thread(self.cluster.join)
        return await self.adopt_orphans(restarted=True)

    async def adopt_orphans(self, restarted: bool = False) -> tuple[list[str], list[str]]:
        """:meth:`recover`'s work on the jobs nobody alive runs: all unfinished ones on SQLite;
        on a shared ledger those of processes whose heartbeat is older than ``instance_stale_s``
        (``restarted``: and this instance id's own, from before this process started)."""
        done, failed, reclaim = await asyncio.to_thread(
            self.ledger.recover_interrupted,
            INTERRUPTED + "; nothing is charged, submit it again with a new nonce",
            self.settings.broker.instance_stale_s,
            restarted,
        )
        for job_id in reclaim:
            try:
                ok = await self._reclaim(job_id)
            except (DlisError, SQLAlchemyError) as exc:  # one job's trouble must not strand the rest
                # (they are ours now: no later pass would take them): fail it, releasing its escrow
                log.warning("job %s: reclaim failed (%s); failing it", job_id, exc)
                with contextlib.suppress(DlisError, SQLAlchemyError):  # already ended elsewhere
                    await asyncio.to_thread(self.ledger.fail_job, job_id, INTERRUPTED + f"; reclaim failed: {exc}")
                ok = False
            (done if ok else failed).append(job_id)
        if done or failed:
            log.warning("recovered %d interrupted jobs with receipts and failed %d unfinished", len(done), len(failed))
        return done, failed

    async def _reclaim(self, job_id: str) -> bool:
        """Settle an interrupted job for what its stages served, from the receipts they kept for
        it (``InferenceBackend.unclaimed``): one per layer range, each billing at most the job's
        length. False (and the job failed, its escrow released) when they do not cover the model."""
        row = await asyncio.to_thread(self.ledger.get_job, job_id)
        served = self.catalog.find(row.model) if row is not None else None
        reason = INTERRUPTED + "; the stages kept no complete set of receipts, so nothing is charged"
        if row is None or served is None:
            await asyncio.to_thread(self.ledger.fail_job, job_id, reason)
            return False
        request = json.loads(row.request_json)
        max_new = int(request.get("max_tokens") or 0)
        planned = json.loads(row.route_json or "[]")
        peers = [str(h["peer_id"]) for h in planned]
        found: list[StageReceipt] = []
        try:
            async with asyncio.timeout(self.settings.broker.reclaim_timeout_s):
                ids = await self.tokenize(served, request.get("prompt"), request.get("messages"), max_new)
                peers += [o.peer_id for o in await self.backend.offers(served.base) if o.peer_id not in peers]
                found = await self.backend.unclaimed(bytes.fromhex(job_id[2:]), peers)
        except (TimeoutError, DlisError) as exc:
            log.warning("job %s: could not reclaim its receipts (%s)", job_id, exc)
            ids = []
        limit = len(ids) + max_new
        if (request.get("policy") or {}).get("privacy") == "high":  # its first stage's receipts are shares
            # Shares are paid side by side (not one per range), so only the pair the job was
            # planned on may claim them: any other node's receipt for the range would add to the bill.
            entry = (0, served.manifest.stages[0].layers.end)
            pair = {str(h["node"]).lower() for h in planned if (h["start"], h["end"]) == entry}
            found = [
                dataclasses.replace(r, share=True) if (r.start, r.end) == entry else r
                for r in found
                if (r.start, r.end) != entry or r.node.lower() in pair
            ]
        usable = sorted((r for r in found if 0 < r.tokens <= limit), key=lambda r: r.tokens)
        try:
            covering = covering_receipts(usable, served.num_layers)
        except UpstreamFailed:
            await asyncio.to_thread(self.ledger.fail_job, job_id, reason)
            return False
        route = [RouteHop(r.peer_id, r.node, r.start, r.end, 0) for r in covering]
        note = INTERRUPTED + f"; settled for the {max(r.tokens for r in covering)} tokens its stages served"
        await self._record(job_id, served, ids, [], "", route, covering, None, time.perf_counter(), note=note)
        log.warning("job %s: %s", job_id, note)
        return True

    # ------------------------------------------------------------------ settlement

    async def settle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.broker.settle_interval_s)
            if self.ledger.shared:  # a peer process may have died with jobs running
                try:
                    await self.adopt_orphans()
                except Exception:  # try again on the next tick; the jobs stay open meanwhile
                    log.exception("reclaiming the jobs of stopped broker processes failed; will retry")
            try:
                await asyncio.to_thread(self.settler.settle_once)
            except Exception:  # keep settling on the next tick; the ledger keeps every receipt
                log.exception("settlement pass failed; will retry")

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self.proof_recorder is not None:
            await self.proof_recorder.close()
        await self.backend.close()
        await asyncio.to_thread(self.cluster.leave)
