"""The broker's core: quote, admit, run and record paid jobs; settle them on chain in batches.

Admission order (nothing runs unless all pass): known model (404) -> prompt fits the context
(413) -> the client's EIP-712 authorization is for this broker, model and chain, unexpired, and
signed by the client (401) -> its nonce is unused (409) -> a route satisfies the policy (503) ->
the authorization covers the quoted maximum (402) -> free escrow covers it (402). Then the job is
written to the ledger and runs in the background; tokens stream to subscribers; at the end the
stages' signed receipts and the answer are recorded in one transaction, and the settler pays
them on chain.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from eth_account.signers.local import LocalAccount

from dlis_market.broker.auth import VerifiedAuthorization, verify_authorization
from dlis_market.broker.backend import BackendJob, InferenceBackend, Offer, RouteHop, SignedStageReceipt
from dlis_market.broker.catalog import ModelCatalog, ServedModel
from dlis_market.broker.ledger import JobRow, Ledger, LedgerError, NewJob, NewReceipt
from dlis_market.broker.metrics import BrokerMetrics
from dlis_market.broker.problems import ProblemError, bad_authorization, insufficient_escrow, no_route
from dlis_market.broker.schemas import JobCreate, Policy, Quote
from dlis_market.broker.settlement import Settler
from dlis_market.chain.job_market import JobMarket
from dlis_market.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedRoute:
    hops: list[RouteHop]
    estimated_latency_ms: float
    fallback: bool = False


@dataclass(frozen=True)
class PricedJob:
    """A job's prompt, route and cost bound, before it is admitted."""

    served: ServedModel
    prompt_ids: list[int]
    route: PlannedRoute
    cost: int
    fee: int

    @property
    def total(self) -> int:
        return self.cost + self.fee


Planner = Callable[[list[Offer], ServedModel, Policy, int, int], PlannedRoute]


def price_bound(route: PlannedRoute, prompt_tokens: int, max_tokens: int) -> int:
    """Most the stages can charge: each stage's price times every token it may process."""
    return sum(h.price_per_token * (prompt_tokens + max_tokens) for h in route.hops)


def covering_receipts(receipts: list[SignedStageReceipt], num_layers: int) -> list[SignedStageReceipt]:
    """The receipts of the final route, tiling [0, num_layers) in order (a replaced stage's
    partial receipt is dropped: JobMarket pays one receipt per layer range)."""
    by_start: dict[int, SignedStageReceipt] = {}
    for r in receipts:  # later receipts (after a failover) replace earlier ones for the same start
        by_start[r.start] = r
    out: list[SignedStageReceipt] = []
    at = 0
    while at < num_layers:
        nxt = by_start.get(at)
        if nxt is None:
            raise ProblemError(
                502, "incomplete-receipts", "Incomplete receipts", f"no stage receipt starts at layer {at}"
            )
        out.append(nxt)
        at = nxt.end
    return out


@dataclass
class _Live:
    """Token events of a running job for streaming subscribers."""

    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    done: bool = False


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
    ):
        self.settings = settings
        self.ledger = ledger
        self.market = market
        self.broker = broker
        self.catalog = catalog
        self.backend = backend
        self.planner = planner
        self.settler = Settler(ledger, market, broker, max_batch=settings.broker.settle_max_batch)
        self._live: dict[str, _Live] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.broker.max_concurrent_jobs)
        self._fee_bps: int | None = None
        self.metrics = BrokerMetrics()

    # ------------------------------------------------------------------ pricing

    async def fee_bps(self) -> int:
        if self._fee_bps is None:
            self._fee_bps = await asyncio.to_thread(self.market.fee_bps)
        return self._fee_bps

    async def plan(self, served: ServedModel, policy: Policy, prompt_tokens: int, max_tokens: int) -> PlannedRoute:
        offers = await self.backend.offers(served.name)
        if not offers:
            raise no_route(f"no worker announces any layer of {served.name} ({served.num_layers} layers)")
        return await asyncio.to_thread(self.planner, offers, served, policy, prompt_tokens, max_tokens)

    async def _bound(self, route: PlannedRoute, policy: Policy, prompt_tokens: int, max_tokens: int) -> tuple[int, int]:
        """Upper bound of the stages' charges and the protocol fee on them, within the policy."""
        cost = price_bound(route, prompt_tokens, max_tokens)
        fee = cost * await self.fee_bps() // 10_000
        if policy.max_cost is not None and cost + fee > policy.max_cost:
            raise no_route(
                f"the cheapest route may cost {cost + fee} token units, over the policy's max_cost {policy.max_cost}"
            )
        return cost, fee

    async def price(
        self, model: str, prompt: str | None, messages: list[dict[str, str]] | None, max_tokens: int, policy: Policy
    ) -> PricedJob:
        """Tokenize, check the context, route and bound the cost of a job (nothing is committed)."""
        served = self.catalog.get(model)
        ids = served.encode_prompt(prompt, messages)
        served.check_length(len(ids), max_tokens)
        return await self._priced(served, ids, policy, max_tokens)

    async def _priced(self, served: ServedModel, ids: list[int], policy: Policy, max_tokens: int) -> PricedJob:
        route = await self.plan(served, policy, len(ids), max_tokens)
        cost, fee = await self._bound(route, policy, len(ids), max_tokens)
        return PricedJob(served, ids, route, cost, fee)

    async def quote(
        self, model: str, prompt: str | None, messages: list[dict[str, str]] | None, max_tokens: int, policy: Policy
    ) -> Quote:
        p = await self.price(model, prompt, messages, max_tokens, policy)
        return Quote(
            model=model,
            model_id=p.served.model_id,
            prompt_tokens=len(p.prompt_ids),
            max_tokens=max_tokens,
            route=[{"node": h.node, "peer_id": h.peer_id, "start": h.start, "end": h.end} for h in p.route.hops],
            fallback=p.route.fallback,
            cost=p.cost,
            fee=p.fee,
            max_total=p.total,
            estimated_latency_ms=p.route.estimated_latency_ms,
            broker=self.broker.address,
            chain_id=self.market.client.chain_id,
            job_market=self.market.address,
        )

    # ------------------------------------------------------------------ admission

    async def submit(self, req: JobCreate, spender: str | None = None, priced: PricedJob | None = None) -> JobRow:
        """Admit and start a job. ``spender``: the authorization is signed by this key under the
        client's standing on-chain spending authorization (API-key clients) instead of the client.
        ``priced``: the :meth:`price` of this very request, when the caller already has it."""
        if priced is None:
            served = self.catalog.get(req.model)
            messages = [m.model_dump() for m in req.messages] if req.messages is not None else None
            ids = served.encode_prompt(req.prompt, messages)
            served.check_length(len(ids), req.max_tokens)
        else:
            served, ids = priced.served, priced.prompt_ids
        now = await asyncio.to_thread(self.market.client.timestamp)
        vauth = verify_authorization(
            req.authorization,
            broker=self.broker.address,
            model_id=served.model_id,
            domain=self.market.domain(),
            now=now,
            signer=spender,
        )
        if spender is not None:
            await self._check_spender(vauth.auth.client, spender, vauth.auth.max_cost, now)
        if self.ledger.get_job(vauth.job_id) is not None or await asyncio.to_thread(
            self.market.nonce_used, vauth.auth.client, vauth.auth.nonce
        ):
            raise ProblemError(
                409,
                "nonce-used",
                "Nonce already used",
                f"nonce {vauth.auth.nonce} of {vauth.auth.client} was used; sign a new one",
            )
        priced = priced or await self._priced(served, ids, req.policy, req.max_tokens)
        total = priced.total
        if total > vauth.auth.max_cost:
            raise ProblemError(
                402,
                "authorization-too-low",
                "Authorization too low",
                f"the job may cost up to {total} token units but the authorization allows {vauth.auth.max_cost}; "
                "sign a larger max_cost or ask for fewer tokens",
            )
        await self._check_escrow(vauth.auth.client, vauth.auth.max_cost)
        try:
            row = self.ledger.create_job(
                NewJob(
                    id=vauth.job_id,
                    client=vauth.auth.client,
                    nonce=vauth.auth.nonce,
                    model=served.name,
                    model_id=served.model_id,
                    request=req.model_dump(mode="json", exclude={"authorization"}),
                    max_cost=vauth.auth.max_cost,
                    deadline=vauth.auth.deadline,
                    auth_signature="0x" + vauth.signature.hex(),
                )
            )
        except LedgerError as exc:
            raise ProblemError(409, "nonce-used", "Nonce already used", str(exc)) from exc
        self._live[row.id] = _Live()
        task = asyncio.create_task(self._run(row.id, served, vauth, req, ids, priced.route))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return row

    async def _check_spender(self, client: str, spender: str, need: int, now: int) -> None:
        remaining, expiry = await asyncio.to_thread(self.market.spender_of, client, spender)
        if expiry < now:
            raise bad_authorization(f"the API key's on-chain spending authorization expired at {expiry} (now {now})")
        free = remaining - self.ledger.committed_escrow(client)
        if free < need:
            raise insufficient_escrow(need, max(free, 0), client)

    async def _check_escrow(self, client: str, need: int) -> None:
        escrow = await asyncio.to_thread(self.market.escrow_of, client)
        free = escrow - self.ledger.committed_escrow(client)
        if free < need:
            raise insufficient_escrow(need, max(free, 0), client)

    # ------------------------------------------------------------------ running

    async def _run(
        self,
        job_id: str,
        served: ServedModel,
        vauth: VerifiedAuthorization,
        req: JobCreate,
        ids: list[int],
        route: PlannedRoute,
    ) -> None:
        live = self._live[job_id]
        started = time.perf_counter()
        ttft: float | None = None
        out: list[int] = []
        text = ""
        try:
            async with self._slots:
                hops = [{"node": h.node, "peer_id": h.peer_id, "start": h.start, "end": h.end} for h in route.hops]
                self.ledger.mark_running(job_id, hops, route.fallback)
                s = req.sampling
                stream = await self.backend.start(
                    BackendJob(
                        job_id=bytes.fromhex(job_id[2:]),
                        model=served.name,
                        prompt_ids=ids,
                        max_new_tokens=req.max_tokens,
                        max_cost=vauth.auth.max_cost,
                        greedy=s.greedy,
                        temperature=s.temperature,
                        top_k=s.top_k or 0,
                        top_p=s.top_p or 1.0,
                        seed=s.seed or 0,
                        stop_token_ids=served.eos_token_ids,
                        num_layers=served.num_layers,
                        route=route.hops,
                    )
                )
                async for token in stream.tokens():
                    if ttft is None:
                        ttft = (time.perf_counter() - started) * 1000
                    out.append(token)
                    new_text = served.decode(out)
                    await self._publish(live, {"type": "token", "token_id": token, "text": new_text[len(text) :]})
                    text = new_text
                final_route, receipts = await stream.finish()
            covering = covering_receipts(receipts, served.num_layers)
            cost = sum(r.amount for r in covering)
            fee = cost * await self.fee_bps() // 10_000
            self.ledger.complete_job(
                job_id,
                answer=text,
                token_ids=out,
                prompt_tokens=len(ids),
                receipts=[
                    NewReceipt(
                        i,
                        r.node,
                        r.start,
                        r.end,
                        r.tokens,
                        "0x" + r.output_hash.hex(),
                        r.amount,
                        "0x" + r.signature.hex(),
                    )
                    for i, r in enumerate(covering)
                ],
                cost=cost,
                fee=fee,
                ttft_ms=ttft or 0.0,
                latency_ms=(time.perf_counter() - started) * 1000,
                route=[{"node": h.node, "peer_id": h.peer_id, "start": h.start, "end": h.end} for h in final_route],
            )
            self._observe(job_id)
            await self._publish(live, {"type": "done", "job_id": job_id}, done=True)
        except Exception as exc:  # any failure of the run is recorded on the job and streamed
            log.exception("job %s failed", job_id)
            self.ledger.fail_job(job_id, f"{type(exc).__name__}: {exc}")
            self._observe(job_id)
            await self._publish(live, {"type": "error", "job_id": job_id, "detail": str(exc)}, done=True)

    def _observe(self, job_id: str) -> None:
        row = self.ledger.get_job(job_id)
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
            row = self.ledger.get_job(job_id)
            if row is None:
                raise ProblemError(404, "unknown-job", "Unknown job", f"no job {job_id}")
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

    # ------------------------------------------------------------------ settlement

    async def settle_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.broker.settle_interval_s)
            try:
                await asyncio.to_thread(self.settler.settle_once)
            except Exception:  # keep settling on the next tick; the ledger keeps every receipt
                log.exception("settlement pass failed; will retry")

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await self.backend.close()
