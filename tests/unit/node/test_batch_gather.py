"""A worker waits for the steps of its other open sessions before a forward pass, so sessions at
different positions share one pass: the first stage up to ``node.batch_wait_ms`` (long enough to
merge groups that started apart), later stages briefly (they get a pass's rows in one message).
Sessions with nothing to send (not prefilled, at their last position) and sessions already waited
for in vain are not waited for; a lone session never waits. With ``node.merge_groups`` the first
stage waits up to 1.25 measured pipeline cycles, so groups of sessions that travel apart merge."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from types import SimpleNamespace

import torch

from dlis_market.inference.kv_cache import SessionStore
from dlis_market.inference.messages import StageInput
from dlis_market.node.server import Worker
from dlis_market.node.sessions import Batch, QueuedStep
from tests.unit.inference.reference import tiny_configs


def _step(sid: str, tokens: int = 1) -> SimpleNamespace:
    return SimpleNamespace(inp=SimpleNamespace(session_ids=[sid], num_tokens=tokens))


def _worker(open_sessions: int, wait_ms: float, first: bool = True, length: int = 5, merge: bool = False) -> Worker:
    """Only what _gather reads: the queue, the open sessions (prefilled to ``length`` of 64 tokens
    on the stage), the settings."""
    w = Worker.__new__(Worker)
    w.queue = asyncio.Queue()
    w.sessions = {f"s{i}": object() for i in range(open_sessions)}  # type: ignore[misc]
    w.node = SimpleNamespace(batch_wait_ms=wait_ms, max_batch_sessions=16, merge_groups=merge, merge_wait_max_ms=1000.0)
    store = SessionStore(tiny_configs()["llama"], max_sessions=32, max_session_tokens=64)
    for sid in w.sessions:
        store.open(sid, 64).length = length
    w.stage = SimpleNamespace(is_first=first, sessions=store)
    w._late, w._late_at = set(), {}
    w._arrived, w._cycle_s = {}, None
    return w


async def _gather_after(w: Worker, arrivals: list[tuple[float, str]], first_tokens: int = 1) -> tuple[list[str], float]:
    pending = deque([_step("s0", first_tokens)])
    loop = asyncio.get_running_loop()
    for delay, sid in arrivals:
        loop.call_later(delay, w.queue.put_nowait, _step(sid))
    t0 = time.perf_counter()
    await w._gather(pending)  # type: ignore[arg-type]
    return [s.inp.session_ids[0] for s in pending], time.perf_counter() - t0


def test_waits_for_other_open_sessions_then_runs_them_together():
    w = _worker(open_sessions=3, wait_ms=80)
    sids, took = asyncio.run(_gather_after(w, [(0.005, "s1"), (0.030, "s2")]))
    assert sids == ["s0", "s1", "s2"]
    assert took < 0.07  # returned as soon as every open session had a step, not at the deadline


def test_lone_session_and_zero_wait_run_at_once():
    async def run(open_sessions: int, wait_ms: float) -> float:
        w = _worker(open_sessions, wait_ms)
        t0 = time.perf_counter()
        await w._gather(deque([_step("s0")]))  # type: ignore[arg-type]
        return time.perf_counter() - t0

    assert asyncio.run(run(1, 50)) < 0.005
    assert asyncio.run(run(4, 0)) < 0.005
    assert 0.015 < asyncio.run(run(4, 20)) < 0.1  # the others never came: the wait is bounded


def test_later_stages_wait_only_for_jitter():
    w = _worker(open_sessions=3, wait_ms=80, first=False)
    sids, took = asyncio.run(_gather_after(w, [(0.001, "s1"), (0.040, "s2")]))
    assert sids == ["s0", "s1"]  # s2 came after the short relay wait, not within batch_wait_ms
    assert took < 0.03


def test_sessions_with_nothing_to_send_are_not_waited_for():
    for length in (0, 63):  # not prefilled yet; at position max_length - 1 (its last token is out)
        w = _worker(open_sessions=4, wait_ms=80, length=length)
        w.stage.sessions.get("s0").length = 5
        sids, took = asyncio.run(_gather_after(w, []))
        assert sids == ["s0"] and took < 0.01, length


def test_a_session_waited_for_in_vain_is_late_until_it_runs_with_the_others():
    w = _worker(open_sessions=3, wait_ms=20)

    async def run(*sids: str) -> None:  # only the late bookkeeping of _run: the stage call fails at once
        w.compute = asyncio.Lock()
        w.metrics = SimpleNamespace(step_seconds=SimpleNamespace(labels=lambda _: _Timer()))
        w.stage.forward = None  # not callable: _forward raises TypeError after the bookkeeping
        w.recorder = None
        steps = [QueuedStep(StageInput((s,), (5,), 1, hidden=torch.zeros(1, 1, 4)), "p", "p") for s in sids]
        with contextlib.suppress(TypeError):
            await w._run(Batch(steps))

    async def scenario() -> None:
        sids, took = await _gather_after(w, [(0.002, "s1")])  # s2 never comes
        assert sids == ["s0", "s1"] and took >= 0.015
        assert w._late == {"s2"}
        sids, took = await _gather_after(w, [(0.002, "s1")])
        assert sids == ["s0", "s1"] and took < 0.015  # not waited for again
        await run("s2")
        assert w._late == {"s2"}  # ran alone: still out of step
        await run("s0", "s2")
        assert w._late == set()  # ran with a session in step: waited for again

    asyncio.run(scenario())


class _Timer:
    def time(self) -> _Timer:
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_the_first_stage_measures_how_long_a_step_takes_to_come_round():
    w = _worker(open_sessions=2, wait_ms=4, merge=True)
    for t in (10.0, 10.1, 10.2):
        w._note_cycle(["s0", "s1"], now=t)
    assert w._cycle_s is not None and abs(w._cycle_s - 0.1) < 1e-9
    w._note_cycle(["s0"], now=10.6)  # a slow trip moves the average by a fifth of the difference
    assert abs(w._cycle_s - 0.16) < 1e-9


def test_merge_groups_waits_up_to_a_cycle_for_a_group_that_travels_apart():
    """Two groups 40 ms apart on a pipeline whose cycle is 80 ms: the 4 ms wait lets them run as
    separate passes for the whole generation; merge_groups waits for the other group, once."""
    arrivals = [(0.040, "s1"), (0.041, "s2")]
    apart, took = asyncio.run(_gather_after(_worker(open_sessions=3, wait_ms=4), arrivals))
    assert apart == ["s0"] and took < 0.03
    w = _worker(open_sessions=3, wait_ms=4, merge=True)
    w._cycle_s = 0.080
    merged, took = asyncio.run(_gather_after(w, arrivals))
    assert merged == ["s0", "s1", "s2"] and 0.035 < took < 0.09  # ran as soon as both came
    # bounded: 1.25 cycles (100 ms) for a session that never comes, then it is late
    w = _worker(open_sessions=3, wait_ms=4, merge=True)
    w._cycle_s = 0.080
    sids, took = asyncio.run(_gather_after(w, [(0.040, "s1")]))
    assert sids == ["s0", "s1"] and 0.09 < took < 0.2 and w._late == {"s2"}


def test_merge_groups_waits_no_longer_than_the_cap_nor_before_a_prompt():
    w = _worker(open_sessions=2, wait_ms=4, merge=True)
    w._cycle_s, w.node.merge_wait_max_ms = 5.0, 30.0
    _, took = asyncio.run(_gather_after(w, []))
    assert 0.025 < took < 0.1  # the cap, not 1.25 x 5 s
    w = _worker(open_sessions=2, wait_ms=4, merge=True)
    w._cycle_s = 0.5
    _, took = asyncio.run(_gather_after(w, [], first_tokens=8))  # a prompt: its own pass anyway
    assert took < 0.03


def test_merge_groups_waits_again_for_a_late_group_some_cycles_later():
    """A group missed once (the cycle estimate was still that of fewer sessions) is waited for
    again after LATE_RETRY_CYCLES cycles, so it can still merge; not on every pass before that."""
    from dlis_market.node.sessions import LATE_RETRY_CYCLES

    w = _worker(open_sessions=3, wait_ms=4, merge=True)
    w._cycle_s = 0.010  # 12.5 ms waits

    async def scenario() -> None:
        sids, took = await _gather_after(w, [(0.002, "s1")])  # s2 misses the wait
        assert sids == ["s0", "s1"] and took >= 0.012 and w._late == {"s2"}
        sids, took = await _gather_after(w, [(0.002, "s1")])
        assert sids == ["s0", "s1"] and took < 0.006  # late: not waited for
        await asyncio.sleep(LATE_RETRY_CYCLES * w._cycle_s)
        sids, _ = await _gather_after(w, [(0.002, "s1"), (0.008, "s2")])
        assert sids == ["s0", "s1", "s2"]  # waited for again, and merged

    asyncio.run(scenario())
