"""The SimPy process model: peers that churn, clients that send jobs, and the market around them.

Why one module of this size: the processes below share one simulated world (peers' state, the
network the scheduler reads, the ledger of jobs and their metrics) and interrupt each other (a
churning peer fails the sessions it holds); the batched stage model and the economics are apart
(:mod:`.passes`, :mod:`.economics`).

Processes (simulated seconds; metrics count ``[0, hours)``, jobs that arrived by then finish):

* **churn**, one per peer: online for an exponential time of mean ``heartbeat_s / hazard``, then
  offline for mean ``mean_down_slots`` heartbeats (the class's figures, see :mod:`profiles`). It
  starts a day early so that the oracle's dropout model has a heartbeat record to read; a peer
  going offline interrupts every session it holds.
* **risk**: every ``risk_refresh_slots`` heartbeats each online peer's failure risk is predicted
  by the oracle's :data:`~dlis_market.oracle.dropout.DEFAULT_MODEL` from its heartbeat record.
* **clients**: per client class, Poisson arrivals (open loop) or ``concurrency`` users sending
  one job after another (closed loop), at most ``jobs`` in all. A job is admitted (the broker's
  ``admit_ms``), asks the real :func:`~dlis_market.broker.scheduler.plan_route` for a route over
  the (pruned) network state, retrying every ``route_retry_s`` up to ``job_timeout_s``; holds a KV
  slot on each hop; opens its sessions (``open_ms``); one prefill pass yields the first token and
  one decode pass each further token, each pass costing every hop's per-layer time under its
  current load (re-read every ``decode_chunk_tokens``), every hop's link, the last stage's link
  back to the broker and ``pass_ms``; then closes (``close_ms``: receipts). When a hop drops, it
  fails over through ``plan_route`` again without the failed peer, replaying what was generated,
  at most ``max_failovers`` times (the driver's rule). Only the final route is paid (README).
* **batched stage model** (``stage_model: batched``, :mod:`.passes`): instead of a per-session
  slowdown, every peer runs one forward pass at a time over its queued steps, merged as the
  worker merges them; the broker opens one job's sessions at a time; a spot check re-runs the
  call on the replica; peers (and the broker's work) on one host share its cores; the speed
  spread is the host's over time (``speed_period_s``) plus each pass's jitter (``pass_cv``).
* **spot checks**: after a job that ran on one route, each stage call ``(job id, start)`` drawn by
  the real :class:`~dlis_market.protocol.spot_checks.SpotCheckSampler` is re-run on a replica of
  the same span (none online: not checked); a session a byzantine peer corrupted
  (:func:`~dlis_market.node.byzantine.corrupted`, the worker's own rule) is caught and slashed.
* **settlement**: every ``settle_interval_s`` completed jobs settle in batches of at most
  ``settle_max_batch``, each batch costing the measured gas (:func:`profiles.batch_gas`).
* **reputation**: every ``epoch_s`` the oracle's :func:`~dlis_market.oracle.reputation.score_reputation`
  scores each peer from the epoch's uptime, observed sessions and throughput, checks and stake.

Not modelled: per-message jitter (only a per-job speed spread, ``job_speed_cv``, and in the
batched model ``pass_cv``), CPU shared between workers on one machine in the chunked model
beyond the measured batching curve, correlated outages, the precursor misses of phones before a
drop, a byzantine worker's overstated throughput, the checker's own compute in the chunked
model, gas prices.

Why one module of this size: the SimPy processes (churn, risk, clients, jobs, settlement) share
one simulation clock and the peers' live state; the market rules they call are the project's own
modules, named above, and the scenario and profiles are :mod:`.scenario` and :mod:`.profiles`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy

from dlis_market.broker.network_state import Policy, Route, RouteRequest
from dlis_market.broker.scheduler import NoRouteError, plan_route
from dlis_market.node.byzantine import corrupted
from dlis_market.oracle.dropout import DEFAULT_MODEL, HISTORY_SLOTS
from dlis_market.oracle.reputation import NodeEpochStats, score_reputation
from dlis_market.protocol.spot_checks import SpotCheckSampler
from dlis_market.sim.economics import Ledger, slash
from dlis_market.sim.network import PeerSpec, PeerTable
from dlis_market.sim.passes import BatchedStages, Step
from dlis_market.sim.profiles import batch_gas, slowdown
from dlis_market.sim.scenario import ClientClass, Market, Scenario
from dlis_market.types import ZERO_ADDRESS, model_id

SIM_PUBLISHER = ZERO_ADDRESS  # simulated models live in the zero publisher's namespace


@dataclass
class JobRecord:
    client: str
    arrived: float
    status: str = "running"  # ok | no_route | failovers
    started: float = math.nan  # admitted by the broker: the job runs (its latency_ms counts from here)
    finished: float = math.nan
    first_token: float = math.nan
    tokens: int = 0  # prompt + generated
    new_tokens: int = 0  # generated
    failovers: int = 0
    hops: int = 0
    route: tuple[int, ...] = ()  # peers of the final route
    corrupted_delivered: bool = False

    @property
    def latency_s(self) -> float:
        return self.finished - self.arrived


@dataclass
class PeerStats:
    """Counters of one peer: the epoch's (reset each epoch) and the run's totals."""

    up_s: float = 0.0  # time online within [0, hours)
    session_s: float = 0.0  # KV-slot seconds held
    calls: int = 0
    earned: int = 0
    spent: int = 0  # operating cost of the compute it did
    saved: int = 0  # compute a cheater skipped
    slashed: int = 0
    forfeited: int = 0
    caught: int = 0
    # epoch
    e_ok: int = 0
    e_failed: int = 0
    e_passed: int = 0
    e_failed_checks: int = 0
    e_tokens: int = 0
    e_busy_ms: float = 0.0
    e_up_s: float = 0.0


@dataclass
class _Attempt:
    peers: list[int]
    failed_by: int | None = None
    step: Step | None = None  # the batched model's step it waits for


@dataclass
class _Pending:
    receipts: list[tuple[int, int]]  # (peer, amount)


@dataclass
class SimResult:
    scenario: Scenario
    market: Market
    seed: int
    hours: float
    specs: list[PeerSpec]
    jobs: list[JobRecord]
    peers: list[PeerStats]
    route_ms: list[float]
    route_cpu_ms: list[float]
    solver: dict[str, int]
    ledger: Ledger
    gas: int
    batches: int
    checks_drawn: int
    checks_unreplicated: int
    wall_s: float
    stakes_start: int
    stakes_end: int
    extra: dict[str, Any] = field(default_factory=dict)


def build_peers(scenario: Scenario, market: Market, seed: int) -> list[PeerSpec]:
    devices = scenario.device_table()
    specs: list[PeerSpec] = []
    for g in scenario.peers:
        prof = g.device_profile(devices)
        price = g.price_per_token if g.price_per_token is not None else prof.price_per_token_layer * g.layers.size
        stake = g.stake if g.stake is not None else market.min_stake
        specs += [PeerSpec(g.device, prof, g.layers, price, stake, g.byzantine, g.host) for _ in range(g.count)]
    pop = scenario.population
    if pop is not None and pop.count:
        rng = np.random.default_rng([seed, 7])
        names = sorted(pop.mix)
        weights = np.array([pop.mix[n] for n in names], dtype=np.float64)
        kinds = rng.choice(len(names), size=pop.count, p=weights / weights.sum())
        cheat = rng.random(pop.count) < pop.byzantine_share
        for k, bad in zip(kinds.tolist(), cheat.tolist(), strict=True):
            prof = devices[names[k]]
            span = prof.layouts[int(rng.integers(len(prof.layouts)))]
            price = prof.price_per_token_layer * span.size
            specs.append(PeerSpec(names[k], prof, span, price, market.min_stake, pop.byzantine_rate if bad else 0.0))
    return specs


class Simulation:
    def __init__(self, scenario: Scenario, market: Market, seed: int, hours: float | None = None) -> None:
        self.sc = scenario
        self.mk = market
        self.seed = seed
        self.horizon = 3600.0 * (hours if hours is not None else scenario.hours)
        self.history_s = HISTORY_SLOTS * market.heartbeat_s
        self.env = simpy.Environment(initial_time=-self.history_s)
        self.specs = build_peers(scenario, market, seed)
        m = scenario.model
        self.table = PeerTable(
            self.specs,
            model_id(m.name, SIM_PUBLISHER),
            m.num_layers,
            m.activation_bytes_per_token,
            m.kv_bytes_per_token_layer,
            market.min_stake,
            scenario.offers_track_load,
        )
        self.stats = [PeerStats() for _ in self.specs]
        self.sessions: list[dict[int, _Attempt]] = [{} for _ in self.specs]  # peer -> job -> attempt
        self.attempt_procs: dict[int, simpy.Process] = {}
        self.outages: list[list[list[float]]] = [[] for _ in self.specs]  # [down_at, up_at or inf]
        self.up_since = [-self.history_s] * len(self.specs)
        self.jobs: list[JobRecord] = []
        self.route_ms: list[float] = []
        self.route_cpu_ms: list[float] = []
        self.solver: dict[str, int] = {}
        self.ledger = Ledger()
        self.pending: list[_Pending] = []
        self.gas = 0
        self.batches = 0
        self.checks_drawn = 0
        self.checks_unreplicated = 0
        self.in_flight = 0
        self.sent = [0] * len(scenario.clients)  # jobs each client class has sent
        self.senders = len(scenario.clients)  # client classes still sending
        self.closed = False
        self.drained = self.env.event()
        secret = hashlib.sha256(f"sim-spot-check-secret:{seed}".encode()).digest()
        self.sampler = SpotCheckSampler(market.check_fraction, secret)
        self.stages = BatchedStages(self.env, scenario, self.table, seed) if scenario.stage_model == "batched" else None

    # ------------------------------------------------------------------ churn and risk

    def _online_time(self, peer: int, until: float) -> None:
        """Credit peer's online time since it came up (or the epoch/run start) to ``until``."""
        since = max(self.up_since[peer], 0.0)
        end = min(until, self.horizon)
        if end > since:
            self.stats[peer].up_s += end - since
            self.stats[peer].e_up_s += end - since
        self.up_since[peer] = until

    def _churn(self, peer: int) -> Generator[simpy.Event, Any, None]:
        prof = self.specs[peer].profile
        rng = np.random.default_rng([self.seed, 1, peer])
        slot = self.mk.heartbeat_s
        while True:
            if prof.hazard_per_slot <= 0:
                return
            yield self.env.timeout(rng.exponential(slot / prof.hazard_per_slot))
            self._online_time(peer, self.env.now)
            self.table.up[peer] = False
            self.outages[peer].append([self.env.now, math.inf])
            for attempt in list(self.sessions[peer].values()):
                if attempt.failed_by is None:
                    attempt.failed_by = peer
                    self.attempt_procs[id(attempt)].interrupt(peer)
            yield self.env.timeout(rng.exponential(slot * prof.mean_down_slots))
            self.outages[peer][-1][1] = self.env.now
            self.table.up[peer] = True
            self.up_since[peer] = self.env.now

    def _heartbeats(self, peer: int, now: float) -> np.ndarray:
        slot = self.mk.heartbeat_s
        start = now - HISTORY_SLOTS * slot
        record = np.ones(HISTORY_SLOTS, dtype=np.int8)
        for down, up in self.outages[peer]:
            if up <= start:
                continue
            a = max(0, int((down - start) // slot))
            b = HISTORY_SLOTS if math.isinf(up) else min(HISTORY_SLOTS, math.ceil((up - start) / slot))
            record[a:b] = 0
        return record

    def _risk(self) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(-self.env.now)
        while True:
            now = self.env.now
            for peer in np.flatnonzero(self.table.up).tolist():
                self.outages[peer] = [o for o in self.outages[peer] if o[1] > now - self.history_s]
                self.table.risk[peer] = DEFAULT_MODEL.predict(self._heartbeats(peer, now))
            yield self.env.timeout(self.sc.risk_refresh_slots * self.mk.heartbeat_s)

    # ------------------------------------------------------------------ jobs

    def _clients(self, client: ClientClass, index: int) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(-self.env.now)
        if client.rate_per_s is not None:
            rng = np.random.default_rng([self.seed, 2, index])
            while True:
                yield self.env.timeout(rng.exponential(1.0 / client.rate_per_s))
                if self.env.now >= self.horizon or not self._take(client, index):
                    break
                self.env.process(self._job(client, *self._arrive(client)))
        else:
            users = [self.env.process(self._user(client, index)) for _ in range(client.concurrency or 1)]
            yield self.env.all_of(users)
        self.senders -= 1
        if self.senders == 0:
            self._close_now()

    def _user(self, client: ClientClass, index: int) -> Generator[simpy.Event, Any, None]:
        """One closed-loop user: the next job as soon as the previous one finished."""
        while self.env.now < self.horizon and self._take(client, index):
            yield self.env.process(self._job(client, *self._arrive(client)))

    def _take(self, client: ClientClass, index: int) -> bool:
        if client.jobs is not None and self.sent[index] >= client.jobs:
            return False
        self.sent[index] += 1
        return True

    def _arrive(self, client: ClientClass) -> tuple[JobRecord, int]:
        rec = JobRecord(client=client.name, arrived=self.env.now)
        self.jobs.append(rec)
        self.in_flight += 1
        return rec, len(self.jobs) - 1

    def _plan(self, request: RouteRequest, policy: Policy, excluded: set[int]) -> tuple[Route, list[int]] | None:
        t0, c0 = time.perf_counter(), time.thread_time()
        state, index = self.table.state(request, policy, excluded, self.sc.prune_top_k)
        try:
            route = plan_route(state, request, policy)
        except NoRouteError:
            self._timed(t0, c0)
            self.solver["no_route"] = self.solver.get("no_route", 0) + 1
            return None
        self._timed(t0, c0)
        key = f"{route.solver}{'' if route.optimal else ' (not proven)'}"
        self.solver[key] = self.solver.get(key, 0) + 1
        return route, [index[h.node_id] for h in route.hops]

    def _timed(self, t0: float, c0: float) -> None:
        """Record one route decision's wall time and the CPU time of this thread for it: the part
        other processes on a busy machine cannot stretch (CBC, a child process, counts in the wall
        time only). ``thread_time``: ``process_time`` costs ~50 us a call once torch's threads exist."""
        self.route_ms.append(1000.0 * (time.perf_counter() - t0))
        self.route_cpu_ms.append(1000.0 * (time.thread_time() - c0))

    def _job_speed(self, number: int) -> float:
        """How much longer job ``number`` takes than the model says (``job_speed_cv``; 1.0 if 0)."""
        cv = self.sc.job_speed_cv
        if cv <= 0:
            return 1.0
        sigma = math.sqrt(math.log1p(cv * cv))
        return float(np.random.default_rng([self.seed, 3, number]).lognormal(-sigma * sigma / 2, sigma))

    def _pass_ms(self, peers: list[int], route: Route, tokens: int = 1) -> float:
        """One forward pass of ``tokens`` (1: a decode step; more: a prefill) through the route and
        back to the broker, under each hop's current load (see :class:`~.scenario.Overheads`)."""
        t = self.sc.overheads.pass_ms
        per_layer = 1.0 if tokens == 1 else self.sc.prefill_ratio * tokens
        size = self.table.activation_bytes_per_token * tokens
        for i, hop in zip(peers, route.hops, strict=True):
            t += self.table.compute[i] * slowdown(int(self.table.sessions[i])) * hop.layers.size * per_layer
            t += self.table.latency[i] + 1000.0 * size / self.table.bandwidth[i]
        return float(t + self.table.latency[peers[-1]])  # the last stage answers the broker

    def _job(self, client: ClientClass, rec: JobRecord, number: int) -> Generator[simpy.Event, Any, None]:
        job_id = hashlib.sha256(f"sim-job:{self.seed}:{number}".encode()).digest()
        policy = Policy(
            privacy=client.privacy,
            max_latency_ms_per_token=client.max_latency_ms_per_token,
            max_cost=client.max_cost,
            min_reputation_bps=client.min_reputation_bps,
        )
        done = 0
        excluded: set[int] = set()
        total = client.prompt_tokens + client.max_new_tokens
        over = self.sc.overheads
        speed = self._job_speed(number)
        if over.admit_ms > 0:
            yield self.env.timeout(over.admit_ms / 1000.0)
        rec.started = self.env.now
        while True:
            request = RouteRequest(
                model_id=self.table.model_id,
                prompt_tokens=client.prompt_tokens + done,
                max_new_tokens=client.max_new_tokens - done,
            )
            planned = self._plan(request, policy, excluded)
            while planned is None:
                if self.env.now + self.sc.route_retry_s > rec.arrived + self.sc.job_timeout_s:
                    self._finish(rec, "no_route")
                    return
                yield self.env.timeout(self.sc.route_retry_s)
                planned = self._plan(request, policy, excluded)
            route, peers = planned
            attempt = _Attempt(peers)
            self.attempt_procs[id(attempt)] = self.env.active_process  # type: ignore[assignment]
            started = self.env.now
            for i in peers:
                self.table.sessions[i] += 1
                self.sessions[i][id(attempt)] = attempt
            step_ms, chunk_at = 0.0, self.env.now
            try:
                if self.stages is not None:
                    yield from self.stages.open(over.open_ms)
                    yield from self.stages.run_pass(attempt, request.prompt_tokens, client.max_new_tokens - done <= 1)
                else:
                    prefill = over.open_ms + self._pass_ms(peers, route, request.prompt_tokens)
                    yield self.env.timeout(speed * prefill / 1000.0)
                done = min(done + 1, client.max_new_tokens)  # the prefill's logits give the next token
                if math.isnan(rec.first_token):
                    rec.first_token = self.env.now
                while self.stages is not None and done < client.max_new_tokens:
                    yield from self.stages.run_pass(attempt, 1, client.max_new_tokens - done <= 1)
                    done += 1
                while done < client.max_new_tokens:
                    n = min(self.sc.decode_chunk_tokens, client.max_new_tokens - done)
                    step_ms, chunk_at = speed * self._pass_ms(peers, route), self.env.now
                    yield self.env.timeout(n * step_ms / 1000.0)
                    done += n
                    step_ms = 0.0
            except simpy.Interrupt as intr:
                if attempt.step is not None:  # its stage's loop drops the queued step
                    attempt.step.cancelled = True
                if step_ms > 0:
                    done += min(int((self.env.now - chunk_at) * 1000.0 / step_ms), client.max_new_tokens - done)
                failed = attempt.failed_by if attempt.failed_by is not None else int(str(intr.cause))
                self._release(attempt, started, route, tokens=request.prompt_tokens + done, ok=False)
                self.stats[failed].e_failed += 1
                excluded.add(failed)
                rec.failovers += 1
                if rec.failovers > self.mk.max_failovers:
                    self._finish(rec, "failovers")
                    return
                continue
            self._release(attempt, started, route, tokens=total, ok=True)
            if over.close_ms > 0 and self.stages is not None:
                yield from self.stages.broker_work(over.close_ms)
            elif over.close_ms > 0:
                yield self.env.timeout(speed * over.close_ms / 1000.0)
            rec.tokens, rec.new_tokens, rec.hops, rec.route = total, client.max_new_tokens, len(peers), tuple(peers)
            self._complete(rec, job_id, route, peers, total)
            return

    def _release(self, attempt: _Attempt, started: float, route: Route, tokens: int, ok: bool) -> None:
        self.attempt_procs.pop(id(attempt), None)
        if self.stages is not None:
            self.stages.release(attempt)
        now = self.env.now
        held = max(0.0, min(now, self.horizon) - max(started, 0.0))
        for i, hop in zip(attempt.peers, route.hops, strict=True):
            self.table.sessions[i] -= 1
            self.sessions[i].pop(id(attempt), None)
            st = self.stats[i]
            st.session_s += held
            if i != attempt.failed_by:  # the failed peer's partial work is lost with it
                st.spent += self.specs[i].profile.cost_per_token_layer * hop.layers.size * tokens
            if ok:
                st.e_ok += 1
                st.e_tokens += tokens
                st.e_busy_ms += 1000.0 * (now - started)

    def _complete(self, rec: JobRecord, job_id: bytes, route: Route, peers: list[int], tokens: int) -> None:
        receipts = []
        for i, hop in zip(peers, route.hops, strict=True):
            st, spec = self.stats[i], self.specs[i]
            st.calls += 1
            session = f"0x{job_id.hex()}:{self.table.ids[i]}"
            bad = spec.byzantine > 0 and corrupted(session, spec.byzantine)
            if bad:  # it skipped the compute its cost was booked for
                saved = spec.profile.cost_per_token_layer * hop.layers.size * tokens
                st.spent -= saved
                st.saved += saved
            caught = False
            if rec.failovers == 0 and self.sampler.selected(job_id, hop.layers.start):
                self.checks_drawn += 1
                if self._has_replica(i):
                    if self.stages is not None:  # the replica re-runs the session: compute on its stage
                        self.env.process(self.stages.replay(i, rec.tokens - rec.new_tokens, rec.new_tokens))
                    caught = bad
                    if bad:
                        self._slash(i)
                    else:
                        st.e_passed += 1
                else:
                    self.checks_unreplicated += 1
            if bad and not caught:
                rec.corrupted_delivered = True
            receipts.append((i, hop.cost))
        self.pending.append(_Pending(receipts))
        self._finish(rec, "ok")

    def _has_replica(self, peer: int) -> bool:
        span = (self.specs[peer].layers.start, self.specs[peer].layers.end)
        members = self.table.spans[span]
        live = self.table.up[members] & self.table.stake_ok[members] & (members != peer)
        return bool(live.any())

    def _slash(self, peer: int) -> None:
        s = slash(self.table.stakes[peer], self.mk.slash_amount, self.mk.reporter_share_bps)
        self.ledger.record_slash(s)
        self.table.set_stake(peer, s.stake_after)
        st = self.stats[peer]
        st.slashed += s.taken
        st.caught += 1
        st.e_failed_checks += 1

    def _finish(self, rec: JobRecord, status: str) -> None:
        rec.status, rec.finished = status, self.env.now
        self.in_flight -= 1
        if self.closed and self.in_flight == 0 and not self.drained.triggered:
            self.drained.succeed()

    # ------------------------------------------------------------------ settlement, reputation

    def _settle_all(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[: self.mk.settle_max_batch], self.pending[self.mk.settle_max_batch :]
            for job in batch:
                receipts = [(amount, bool(self.table.stake_ok[i])) for i, amount in job.receipts]
                self.ledger.settle(receipts, self.mk.fee_bps)
                for (i, amount), (_, ok) in zip(job.receipts, receipts, strict=True):
                    if ok:
                        self.stats[i].earned += amount
                    else:
                        self.stats[i].forfeited += amount
            self.gas += batch_gas(len(batch))
            self.batches += 1

    def _settlement(self) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(-self.env.now)
        while True:
            yield self.env.timeout(self.mk.settle_interval_s)
            self._settle_all()

    def _epochs(self) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(-self.env.now)
        while True:
            yield self.env.timeout(self.mk.epoch_s)
            self.score_epoch()

    def score_epoch(self) -> None:
        now = self.env.now
        history: dict[str, NodeEpochStats] = {}
        for i, spec in enumerate(self.specs):
            if self.table.up[i]:
                self._online_time(i, now)
            st = self.stats[i]
            advertised = 1000.0 / (float(self.table.advertised[i]) * spec.layers.size)
            history[self.table.ids[i]] = NodeEpochStats(
                node=self.table.ids[i],
                uptime_fraction=min(1.0, st.e_up_s / self.mk.epoch_s),
                advertised_tps=advertised,
                measured_tps=st.e_tokens / (st.e_busy_ms / 1000.0) if st.e_busy_ms > 0 else None,
                sessions_ok=st.e_ok,
                sessions_failed=st.e_failed,
                checks_passed=st.e_passed,
                checks_failed=st.e_failed_checks,
                stake=self.table.stakes[i],
                min_stake=self.mk.min_stake,
            )
            st.e_ok = st.e_failed = st.e_passed = st.e_failed_checks = st.e_tokens = 0
            st.e_busy_ms = st.e_up_s = 0.0
        scores = score_reputation(history)
        for i, node in enumerate(self.table.ids):
            self.table.reputation[i] = scores[node]

    def _close(self) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(self.horizon - self.env.now)
        self._close_now()

    def _close_now(self) -> None:
        """No more arrivals (the horizon passed, or every client class sent its jobs)."""
        self.closed = True
        if self.in_flight == 0 and not self.drained.triggered:
            self.drained.succeed()

    # ------------------------------------------------------------------ run

    def run(self) -> SimResult:
        t0 = time.perf_counter()
        stakes_start = sum(self.table.stakes)
        for peer in range(len(self.specs)):
            self.env.process(self._churn(peer))
        self.env.process(self._risk())
        for k, client in enumerate(self.sc.clients):
            self.env.process(self._clients(client, k))
        self.env.process(self._settlement())
        self.env.process(self._epochs())
        self.env.process(self._close())
        drain_cap = self.env.timeout(self.horizon - self.env.now + 2 * self.sc.job_timeout_s + 3600.0)
        self.env.run(until=self.env.any_of([self.drained, drain_cap]))
        for peer in range(len(self.specs)):
            if self.table.up[peer]:
                self._online_time(peer, self.env.now)
        self._settle_all()
        return SimResult(
            scenario=self.sc,
            market=self.mk,
            seed=self.seed,
            hours=self.horizon / 3600.0,
            specs=self.specs,
            jobs=self.jobs,
            peers=self.stats,
            route_ms=self.route_ms,
            route_cpu_ms=self.route_cpu_ms,
            solver=dict(sorted(self.solver.items())),
            ledger=self.ledger,
            gas=self.gas,
            batches=self.batches,
            checks_drawn=self.checks_drawn,
            checks_unreplicated=self.checks_unreplicated,
            wall_s=time.perf_counter() - t0,
            stakes_start=stakes_start,
            stakes_end=sum(self.table.stakes),
            extra={
                "passes": [vars(s.log) for s in self.stages.servers],
                "awaited_at_end": [len(s.due) for s in self.stages.servers],  # sessions a server still waits for
            }
            if self.stages is not None
            else {},
        )


def simulate(scenario: Scenario, market: Market, seed: int, hours: float | None = None) -> SimResult:
    """Run one seed of ``scenario`` under ``market``."""
    return Simulation(scenario, market, seed, hours).run()


def run_seeds(
    scenario: Scenario, market: Market, seeds: int, hours: float | None = None, first: int = 0
) -> list[SimResult]:
    """``seeds`` independent runs (seeds ``first .. first + seeds - 1``)."""
    return [simulate(scenario, market, seed, hours) for seed in range(first, first + seeds)]
