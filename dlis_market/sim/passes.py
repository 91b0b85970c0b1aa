"""The "batched" stage model: each peer's forward passes, one at a time, over its queued steps.

Why: a real worker does not give each session its own compute. Its compute loop
(``node/server.py``) takes every step queued while it was busy, waits up to ``batch_wait_ms``
(later stages at most ``RELAY_WAIT_S``) for the steps of the sessions it has prefilled that have
steps to come, merges the steps of the same token count into one forward pass
(``node/sessions.py`` ``plan_batches``) and runs those passes one after another. So
concurrent decode sessions share a pass that costs little more than one (the measured batch
curve), a prefill that arrives while a decode pass runs waits for it, and simultaneous prefills
merge. ``make demo`` also runs every worker on one machine: passes of different workers that run
at the same time share its cores, the way the kernel shares CPU time between runnable threads.

:class:`HostCpu` is that sharing (processor sharing with the host's background load);
:class:`StageServer` is one peer's compute loop; :class:`BatchedStages` holds them for one run,
with the broker's side (sessions opened one job at a time, its work on its host) and the speed
spread. A message takes the link's latency plus a draw of the measured delays
(``message_jitter_ms``). The driver sends each session's step to the first stage in a message of
its own, so sessions that one pass answered come back to it a little apart, and beyond
``batch_wait_ms`` they split, as real ones do (a merged pair of real sessions stays within 0-5 ms
of each other, and now and then splits); a stage sends a pass's rows on in one message.
The job process in :mod:`.engine` sends each pass through the route's servers hop by hop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import simpy

from dlis_market.node.sessions import RELAY_WAIT_S
from dlis_market.sim.network import PeerTable
from dlis_market.sim.profiles import batch_cost
from dlis_market.sim.scenario import Scenario


@dataclass
class _Work:
    left_ms: float  # at full speed
    threads: int
    done: simpy.Event


class HostCpu:
    """``cores`` shared by the passes running on a host and ``background`` other runnable threads:
    while the running passes keep ``n`` threads busy, each runs at ``min(1, cores / (background +
    n))`` of its full speed (every runnable thread gets an equal share of the cores)."""

    def __init__(self, env: simpy.Environment, cores: float, background: float) -> None:
        self.env, self.cores, self.background = env, cores, background
        self.running: list[_Work] = []
        self.since = env.now
        self.generation = 0

    def speed(self) -> float:
        demand = self.background + sum(w.threads for w in self.running)
        return 1.0 if demand <= self.cores else self.cores / demand

    def run(self, work_ms: float, threads: int) -> simpy.Event:
        """An event that fires when ``work_ms`` of full-speed compute is done on this host."""
        self._advance()
        work = _Work(work_ms, threads, self.env.event())
        self.running.append(work)
        self._schedule()
        return work.done

    def _advance(self) -> None:
        elapsed_ms = 1000.0 * (self.env.now - self.since) * self.speed()
        for w in self.running:
            w.left_ms -= elapsed_ms
        self.since = self.env.now

    def _schedule(self) -> None:
        self.generation += 1
        if self.running:
            left = min(w.left_ms for w in self.running)
            self.env.process(self._wake(self.generation, max(left, 0.0) / self.speed() / 1000.0))

    def _wake(self, generation: int, after_s: float) -> Generator[simpy.Event, Any, None]:
        yield self.env.timeout(after_s)
        if generation != self.generation:  # the running set changed since: a later wake-up rules
            return
        self._advance()
        finished = [w for w in self.running if w.left_ms <= 1e-9]
        self.running = [w for w in self.running if w.left_ms > 1e-9]
        for w in finished:
            w.done.succeed()
        self._schedule()


@dataclass
class Step:
    """One session's input at one stage: ``tokens`` per session (1: a decode step)."""

    session: int
    tokens: int
    done: simpy.Event
    last: bool = False  # the session's last step here: no more to wait for after it
    cancelled: bool = False  # its job failed over meanwhile: the pass skips it
    sent_ms: float = 0.0  # the delay of the message that carries the pass's rows on (one per pass)


@dataclass
class PassLog:
    """What one server ran: passes and the session-steps in them, by phase."""

    decode_passes: int = 0
    decode_steps: int = 0
    prefill_passes: int = 0
    prefill_steps: int = 0
    busy_s: float = 0.0
    decode_busy_s: float = 0.0  # a decode pass's mean duration (host sharing included) = this / decode_passes


@dataclass
class StageServer:
    """One peer's compute loop. ``pass_ms(tokens, sessions)`` is a pass's full-speed compute time
    (the peer's per-layer time, layers, prefill ratio, batch curve and the host's speed factor).
    ``due`` are the sessions whose next step the loop waits for (node/server.py ``_awaited``):
    prefilled here and not past their last step. The worker also stops waiting for a session that
    missed a wait until it runs in one pass with the others (``_late``); the model leaves that out:
    with it, the 4-user calibration merged 1.12 sessions per pass against 1.53 measured (and the
    latency p50 went from 1.05x to 1.32x of the real one), because the first stage's message delays
    are drawn from `info` round trips while the workers compute, which make more sessions late
    than the driver's own messages do.

    What leaving it out costs: at 2 users (almost never merged) every stage waits the full
    ``batch_wait_ms`` for the other session on every pass, about 12 ms a token: the sim's 2-user
    token time is 126 / 142 ms against 110 / 123 ms measured (runs 1 / 2) while its passes match the
    workers' own timers within 1-8 %, so that wait is the 2-user latency p50's 1.15x. And at 4 users
    merged sessions stay merged for 22-27 tokens where the clients' token times show 4-6 (a real
    pair splits every few tokens). With ``_late`` and a delay of its own for each session's step to
    the first stage, pairs split after about 2 tokens (merging 1.1, 4-user p50 1.24-1.32x); with one
    delay for the steps the driver pushes after one ``tokens`` message, never (merging 1.9, 4-user
    p90 0.83-0.85x). What splits real pairs every 4-6 tokens is not measured yet, so neither is kept."""

    env: simpy.Environment
    pass_ms: Callable[[int, int], float]
    host: HostCpu | None
    threads: int
    batch_wait_s: float
    max_batch: int
    queue: list[Step] = field(default_factory=list)
    log: PassLog = field(default_factory=PassLog)
    due: set[int] = field(default_factory=set)
    message_delay: Callable[[], float] = lambda: 0.0

    def __post_init__(self) -> None:
        self.wake = self.env.event()
        self.env.process(self._loop())

    def submit(self, session: int, tokens: int, last: bool = False) -> Step:
        step = Step(session, tokens, self.env.event(), last)
        self.queue.append(step)
        if not self.wake.triggered:
            self.wake.succeed()
        return step

    def forget(self, session: int) -> None:
        """The session closed or failed over: its steps are no longer waited for."""
        self.due.discard(session)

    def _loop(self) -> Generator[simpy.Event, Any, None]:
        while True:
            self.queue = [s for s in self.queue if not s.cancelled]
            if not self.queue:
                self.wake = self.env.event()
                yield self.wake
                continue
            yield from self._gather()
            taken: dict[int, list[Step]] = {}  # token count -> steps, in order of arrival
            seen: set[int] = set()
            deferred = []
            for s in self.queue:
                if s.cancelled:
                    continue
                if s.session in seen or len(seen) >= self.max_batch:
                    deferred.append(s)
                    continue
                seen.add(s.session)
                taken.setdefault(s.tokens, []).append(s)
            self.queue = deferred
            for tokens, steps in taken.items():
                yield from self._run(tokens, steps)

    def _gather(self) -> Generator[simpy.Event, Any, None]:
        """node/server.py ``_gather``: wait up to ``batch_wait_s`` for the steps of due sessions not
        queued yet."""
        if self.batch_wait_s <= 0:
            return
        deadline = self.env.now + self.batch_wait_s
        while True:
            queued = {s.session for s in self.queue if not s.cancelled}
            if len(queued) >= self.max_batch or not self.due - queued:
                return
            left = deadline - self.env.now
            if left <= 0:
                return
            self.wake = self.env.event()
            yield self.wake | self.env.timeout(left)

    def _run(self, tokens: int, steps: list[Step]) -> Generator[simpy.Event, Any, None]:
        began = self.env.now
        work = self.pass_ms(tokens, len(steps))
        if self.host is None:
            yield self.env.timeout(work / 1000.0)
        else:
            yield self.host.run(work, self.threads)
        self.log.busy_s += self.env.now - began
        if tokens == 1:
            self.log.decode_busy_s += self.env.now - began
            self.log.decode_passes += 1
            self.log.decode_steps += len(steps)
        else:
            self.log.prefill_passes += 1
            self.log.prefill_steps += len(steps)
        # node/server.py _deliver: the pass's rows go on in one message (one per next peer there; one
        # per pass here, where the sessions of a pass share their route)
        sent_ms = self.message_delay()
        for s in steps:
            if s.cancelled:
                continue
            s.sent_ms = sent_ms
            if s.last:
                self.forget(s.session)
            else:
                self.due.add(s.session)
            s.done.succeed()


def pass_cost(tokens: int, sessions: int, prefill_ratio: float, decode: dict[int, float],
              prefill: dict[int, float]) -> float:  # fmt: skip
    """One pass over ``sessions`` sessions of ``tokens`` each, in decode steps of one session."""
    if tokens == 1:
        return batch_cost(decode, sessions)
    return prefill_ratio * tokens * batch_cost(prefill, sessions)


def lognormal(rng: np.random.Generator, cv: float) -> float:
    """A draw of mean 1 and coefficient of variation ``cv`` (1.0 if 0)."""
    if cv <= 0:
        return 1.0
    sigma = math.sqrt(math.log1p(cv * cv))
    return float(rng.lognormal(-sigma * sigma / 2, sigma))


class HoldsStep(Protocol):
    peers: list[int]
    step: Step | None


class BatchedStages:
    """One run's stage servers, hosts and broker side under the batched model."""

    def __init__(self, env: simpy.Environment, sc: Scenario, table: PeerTable, seed: int) -> None:
        self.env, self.sc, self.table, self.seed = env, sc, table, seed
        hosts = {name: HostCpu(env, h.cores, h.background_threads) for name, h in sc.hosts.items()}
        self.broker_opens = simpy.Resource(env, capacity=1)  # the broker opens one job's sessions at a time
        self.broker_host = hosts[sc.broker_host] if sc.broker_host is not None else None
        self.offset = float(np.random.default_rng([seed, 4]).uniform(0, sc.speed_period_s))
        self.speeds: dict[int, float] = {}
        self.jitter = np.random.default_rng([seed, 5])
        self.messages = np.random.default_rng([seed, 6])
        self.message_jitter = np.asarray(sc.message_jitter_ms, dtype=float)
        wait_s = sc.batch_wait_ms / 1000.0
        self.servers = [  # a later stage waits at most RELAY_WAIT_S: a pass's rows come in one message
            StageServer(env, functools.partial(self._pass_ms, i), hosts[spec.host] if spec.host is not None else None,
                        spec.profile.threads, wait_s if spec.layers.start == 0 else min(wait_s, RELAY_WAIT_S),
                        sc.max_batch_sessions, message_delay=self._message_jitter)
            for i, spec in enumerate(table.specs)
        ]  # fmt: skip

    def _pass_ms(self, peer: int, tokens: int, sessions: int) -> float:
        sc = self.sc
        c = pass_cost(tokens, sessions, sc.prefill_ratio, sc.batch_decode_cost, sc.batch_prefill_cost)
        base = float(self.table.compute[peer]) * int(self.table.size[peer])
        return base * c * self.speed_now() * lognormal(self.jitter, sc.pass_cv)

    def speed_now(self) -> float:
        """The machine's speed now: ``job_speed_cv``'s lognormal, redrawn every ``speed_period_s``
        (every job running in one period shares it: the load of other programs comes and goes)."""
        window = int((self.env.now + self.offset) // self.sc.speed_period_s)
        got = self.speeds.get(window)
        if got is None:
            rng = np.random.default_rng([self.seed, 3, window & 0xFFFFFFFF])
            got = self.speeds[window] = lognormal(rng, self.sc.job_speed_cv)
        return got

    def broker_work(self, ms: float) -> Generator[simpy.Event, Any, None]:
        """The broker's own work (opening, closing sessions, a pass's messaging): on its host it
        shares the cores with the stages' passes (one thread: its event loop)."""
        if self.broker_host is None:
            yield self.env.timeout(self.speed_now() * ms / 1000.0)
        else:
            yield self.broker_host.run(self.speed_now() * ms, 1)

    def open(self, ms: float) -> Generator[simpy.Event, Any, None]:
        with self.broker_opens.request() as turn:
            yield turn
            yield from self.broker_work(ms)

    def run_pass(self, job: HoldsStep, tokens: int, last: bool) -> Generator[simpy.Event, Any, None]:
        """One pass through the route's stage servers: each hop's link, then its queue and pass;
        the last stage's answer back to the broker, and the broker's messaging (``pass_ms``).
        ``last``: the job's last pass (the driver feeds every token but the last). The driver
        sends each session's step to the first stage on its own (a message delay of its own);
        a stage sends a pass's rows on in one message, so sessions one pass answered reach the
        next stage, or the broker, together."""
        t = self.table
        size = t.activation_bytes_per_token * tokens
        delay = self._message_jitter()
        for i in job.peers:
            yield self.env.timeout((t.latency[i] + 1000.0 * size / t.bandwidth[i] + delay) / 1000.0)
            job.step = step = self.servers[i].submit(id(job), tokens, last)
            yield step.done
            delay = step.sent_ms
        job.step = None
        yield self.env.timeout((t.latency[job.peers[-1]] + delay) / 1000.0)
        if self.sc.overheads.pass_ms > 0:
            yield from self.broker_work(self.sc.overheads.pass_ms)

    def release(self, job: HoldsStep) -> None:
        """The job's sessions closed (done, or failed over): no server waits for them."""
        for i in job.peers:
            self.servers[i].forget(id(job))

    def _message_jitter(self) -> float:
        """One message's delay beyond its link's latency (ms): a draw of the measured ones."""
        if not self.message_jitter.size:
            return 0.0
        return float(self.message_jitter[self.messages.integers(self.message_jitter.size)])

    def replay(self, peer: int, prompt: int, new: int) -> Generator[simpy.Event, Any, None]:
        """A spot check's re-run of ``peer``'s call on a replica (node/replay.py): a fresh session,
        its prefill, then its decode steps one at a time, each from the broker and back."""
        t = self.table
        members = t.spans[(int(t.start[peer]), int(t.end[peer]))]
        replica = int(members[t.up[members] & t.stake_ok[members] & (members != peer)][0])
        link = 2 * float(t.latency[replica]) / 1000.0
        key = object()  # the replay's own session
        t.sessions[replica] += 1
        steps = [prompt] + [1] * max(new - 1, 0)
        try:
            for n, tokens in enumerate(steps, 1):
                yield self.env.timeout(link)
                yield self.servers[replica].submit(id(key), tokens, n == len(steps)).done
        finally:
            t.sessions[replica] -= 1
            self.servers[replica].forget(id(key))
