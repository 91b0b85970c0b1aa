"""64 clients at once against a real uvicorn broker (real chain, BrokerService, ledger and
settlement) whose workers have a fixed number of KV-cache slots: the broker queues what it cannot
run yet, answers 429 with Retry-After when its queue is full or the wait runs out, never 5xx, and
every job it admitted completes and is settled, with the money conserved.

The backend double plays three workers with ``CAPACITY`` sessions each that take ``DELAY_S`` per
token and sign real receipts; like real workers they announce their free slots (the broker routes
on them) and refuse a session when full. With a per-opener share, like real workers they also hold
at most that many sessions of one opener (the broker's driver is one opener for all its jobs),
announce it, and refuse the opener's next session past it."""

from __future__ import annotations

import asyncio
import secrets
import time

import httpx

from dlis_market.broker.app import create_app
from dlis_market.broker.service import BrokerService
from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.types import model_id
from tests.integration.broker import conftest as broker_suite
from tests.integration.conftest import DEV_PUBLISHER

broker_env = broker_suite.broker_env  # the broker suite's fixtures
live_server = broker_suite.live_server
UNIT = 10**18
MODEL = "smollm2-135m"
CLIENTS = 64
CAPACITY = 4  # sessions each worker holds at once
DELAY_S = 0.05  # per token
MAX_TOKENS = 8


class BusyWorkersError(RuntimeError):
    pass


class FixedCapacityBackend(broker_suite.ScriptedBackend):
    """Workers with ``capacity`` KV-cache slots each: offers announce the free ones, a session
    started while they are all taken is refused (as a real worker does), and each token takes
    ``delay_s``. Records the most sessions held at once."""

    def __init__(
        self, base: broker_suite.ScriptedBackend, capacity: int, delay_s: float, opener_share: int | None = None
    ):
        super().__init__(base.nodes, base.domain, base.script)
        self.capacity = capacity
        self.delay_s = delay_s
        self.opener_share = opener_share  # what one opener (this broker) may hold on a worker
        self.active = 0
        self.peak = 0
        self.refused = 0

    async def offers(self, model: str):
        offers = await super().offers(model)
        update = {"free_slots": self.capacity - self.active}
        if self.opener_share is not None:
            update["opener_slots"] = self.opener_share
        return [o.model_copy(update=update) for o in offers]

    async def start(self, job):
        if self.active >= self.capacity:
            self.refused += 1
            raise BusyWorkersError(f"no free KV-cache slot: all {self.capacity} sessions are taken")
        if self.opener_share is not None and self.active >= self.opener_share:
            self.refused += 1  # every session here is this broker's: one opener
            raise BusyWorkersError(f"the broker already holds {self.active} sessions here, the limit per opener")
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.jobs.append(job)
        backend, served, closed = self, [], [False]

        def close() -> None:
            if not closed[0]:
                closed[0] = True
                backend.active -= 1

        class Stream:
            async def _gen(self):
                try:
                    for t in backend.script[: job.max_new_tokens]:
                        await asyncio.sleep(backend.delay_s)
                        served.append(t)
                        yield t
                except BaseException:
                    close()
                    raise

            def tokens(self):
                return self._gen()

            async def finish(self):
                close()
                from tests.chaos.test_broker_retries import signed_route

                return signed_route(backend, job, len(job.prompt_ids) + len(served))

        return Stream()


def job_body(market, client) -> dict:
    auth = JobAuthorization(
        client.address, market.broker.address, bytes.fromhex(model_id(MODEL, DEV_PUBLISHER)[2:]), UNIT,
        secrets.randbits(64), market.client.timestamp() + 900,
    )  # fmt: skip
    sig = sign_authorization(client.key, market.market().domain(), auth).hex()
    return {
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": MAX_TOKENS,
        "authorization": {"client": client.address, "nonce": str(auth.nonce), "max_cost": str(UNIT),
                          "deadline": auth.deadline, "signature": sig},
    }  # fmt: skip


def test_overload_queues_then_answers_429_with_retry_after(broker_env, live_server):
    market, service, backend, ops, nodes, client = broker_env
    jm = market.market()
    jm.deposit(client, 80 * UNIT)
    broker = market.settings.broker.model_copy(
        update={"admission_queue_max": 16, "admission_wait_s": 10.0, "admission_poll_s": 0.2}
    )
    settings = market.settings.model_copy(update={"broker": broker})
    workers = FixedCapacityBackend(backend, CAPACITY, DELAY_S)
    svc = BrokerService(
        settings, service.ledger, service.market, service.broker, service.catalog, workers, service.planner
    )
    srv = live_server(create_app(svc, settle_in_background=False))
    bodies = [job_body(market, client) for _ in range(CLIENTS)]
    escrow_before = jm.escrow_of(client.address)
    payees = [o.address for o in ops] + [market.deployment_treasury()]
    credited_before = [jm.claimable_of(a) for a in payees]
    committed_peak = 0

    async def one(http: httpx.AsyncClient, body: dict) -> tuple[int, dict, dict]:
        res = await http.post("/v1/jobs", json=body)
        return res.status_code, dict(res.headers), res.json()

    async def watch(stop: asyncio.Event) -> None:
        # A job waiting in the queue holds no escrow: what is committed never exceeds the jobs
        # that may run at once.
        nonlocal committed_peak
        while not stop.is_set():
            committed = await asyncio.to_thread(svc.ledger.committed_escrow, client.address)
            committed_peak = max(committed_peak, committed)
            await asyncio.sleep(0.05)

    async def load() -> list[tuple[int, dict, dict]]:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as http:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch(stop))
            try:
                async with asyncio.timeout(60):
                    return await asyncio.gather(*(one(http, b) for b in bodies))
            finally:
                stop.set()
                await watcher

    t0 = time.monotonic()
    results = asyncio.run(load())
    took = time.monotonic() - t0
    statuses = sorted({s for s, _, _ in results})
    by_status = {s: sum(1 for r in results if r[0] == s) for s in statuses}
    print(f"{CLIENTS} clients in {took:.1f} s: {by_status}; peak sessions {workers.peak}, refused {workers.refused}")
    odd = [(s, b.get("detail") or b.get("status")) for s, _, b in results if s not in (201, 429)]
    assert not odd, f"answers other than 201/429: {odd[:5]} ({len(odd)} in all)"
    throttled = [(h, b) for s, h, b in results if s == 429]
    assert all("retry-after" in h and int(h["retry-after"]) >= 1 for h, _ in throttled), throttled[:3]
    assert all(b["type"].endswith("overloaded") for _, b in throttled)
    admitted = [b for s, _, b in results if s == 201]
    assert len(admitted) >= CAPACITY + 16 // 2, by_status  # the queue served, not only the first few
    assert all(b["status"] == "completed" for b in admitted), [b["error"] for b in admitted if b["error"]][:3]
    assert workers.refused == 0 and workers.peak <= CAPACITY
    reg = svc.metrics.registry
    assert reg.get_sample_value("dlis_broker_admission_refused_total") == len(throttled)
    assert reg.get_sample_value("dlis_broker_jobs_running") == 0
    assert reg.get_sample_value("dlis_broker_admission_waiting") == 0
    assert committed_peak <= settings.broker.max_concurrent_jobs * UNIT, committed_peak

    while svc.settler.settle_once().settled_batches:
        pass
    rows = [svc.ledger.get_job(b["id"]) for b in admitted]
    assert all(r is not None and r.batch_id is not None for r in rows)
    assert all(svc.ledger.get_batch(r.batch_id).status == "settled" for r in rows if r is not None)
    charged = sum(r.cost + r.fee for r in rows if r is not None)
    assert escrow_before - jm.escrow_of(client.address) == charged
    credited = sum(jm.claimable_of(a) - b for a, b in zip(payees, credited_before, strict=True))
    assert credited == charged  # escrow debits = receipts credited to operators + fees to the treasury
    assert svc.ledger.committed_escrow(client.address) == 0


def test_a_broker_keeps_its_jobs_within_each_workers_share_per_opener(broker_env, live_server):
    """A worker holds at most ``node.max_sessions_per_opener`` sessions of one opener, and a broker's
    driver is one opener for all its jobs. A crowd of jobs larger than that share, on workers that
    still announce free slots, waits in the broker's line for the share to free up: no job is
    planned onto a worker that would refuse it (a refused open routes around, and with no other
    worker for the range the job fails), and every job completes."""
    market, service, backend, ops, nodes, client = broker_env
    share, crowd = 3, 9
    market.market().deposit(client, 20 * UNIT)
    broker = market.settings.broker.model_copy(
        update={"admission_queue_max": 16, "admission_wait_s": 20.0, "admission_poll_s": 0.2}
    )
    settings = market.settings.model_copy(update={"broker": broker})
    workers = FixedCapacityBackend(backend, 4 * share, DELAY_S, opener_share=share)
    svc = BrokerService(
        settings, service.ledger, service.market, service.broker, service.catalog, workers, service.planner
    )
    srv = live_server(create_app(svc, settle_in_background=False))

    async def load() -> list[tuple[int, dict]]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:

            async def one(body: dict) -> tuple[int, dict]:
                res = await http.post("/v1/jobs", json=body)
                return res.status_code, res.json()

            async with asyncio.timeout(60):
                return await asyncio.gather(*(one(job_body(market, client)) for _ in range(crowd)))

    results = asyncio.run(load())
    print(f"{crowd} jobs at once, share {share}: peak sessions {workers.peak}, refused opens {workers.refused}")
    assert [s for s, _ in results] == [201] * crowd, [(s, b.get("detail")) for s, b in results]
    assert [b["status"] for _, b in results] == ["completed"] * crowd, [b["error"] for _, b in results]
    assert workers.refused == 0, "the broker planned a job onto a worker past its share per opener"
    assert workers.peak == share  # the share was used in full, and never exceeded
    assert svc.metrics.registry.get_sample_value("dlis_broker_jobs_running") == 0


def test_a_failover_stays_within_each_workers_share_per_opener(broker_env):
    """A job's failed stage is replaced through the broker's scheduler: not by a worker that already
    holds its share of this broker's sessions (it would refuse the open), however fast and cheap,
    and the worker chosen counts against its share until the job ends."""
    from dlis_market.broker.job_types import AdmissionTicket
    from dlis_market.broker.schemas import Policy
    from dlis_market.protocol.routes import RouteHop

    market, service, backend, ops, nodes, client = broker_env
    fast, spare = (market.enroll_node(market.new_funded_account(1000 * UNIT)) for _ in range(2))
    share = 2

    class TwoSpares(broker_suite.ScriptedBackend):
        async def offers(self, model):
            quick = {"throughput": 500.0, "price_per_token": broker_suite.PRICE // 2, "opener_slots": share}
            return [
                *(o.model_copy(update={"opener_slots": share}) for o in await super().offers(model)),
                broker_suite.span(model, "fast", fast.address, 10, 20, 4).model_copy(update=quick),
                broker_suite.span(model, "spare", spare.address, 10, 20, 4).model_copy(update={"opener_slots": share}),
            ]

    workers = TwoSpares(backend.nodes, backend.domain, backend.script)
    svc = BrokerService(
        market.settings, service.ledger, service.market, service.broker, service.catalog, workers, service.planner
    )
    svc._holding["fast"] = share  # two other jobs of this broker run there
    ticket = AdmissionTicket(peers=[], slot_held=False)
    replan = svc._replanner(svc.catalog.get(MODEL), Policy(), 6, MAX_TOKENS, 0, ticket)
    route = [RouteHop(f"peer{i}", n.address, s, e, broker_suite.PRICE)
             for i, ((s, e), n) in enumerate(zip(broker_suite.SPANS, nodes, strict=True))]  # fmt: skip

    hops = asyncio.run(replan(route, frozenset({"peer1"})))
    assert [h.peer_id for h in hops] == ["peer0", "spare", "peer2"]  # on the code before: "fast"
    assert ticket.holding == ["spare"] and svc._holding["spare"] == 1
    svc._release(ticket)  # the job ended
    assert svc._holding["spare"] == 0 and svc._holding["fast"] == share
