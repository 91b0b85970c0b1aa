"""A worker waits a few milliseconds for the steps of its other open sessions before a forward
pass, so sessions at different positions share one pass; a lone session never waits."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from types import SimpleNamespace

from dlis_market.node.server import Worker


def _step(sid: str) -> SimpleNamespace:
    return SimpleNamespace(inp=SimpleNamespace(session_ids=[sid]))


def _worker(open_sessions: int, wait_ms: float) -> Worker:
    w = Worker.__new__(Worker)  # only what _gather reads: the queue, the open sessions, the settings
    w.queue = asyncio.Queue()
    w.sessions = {f"s{i}": object() for i in range(open_sessions)}
    w.node = SimpleNamespace(batch_wait_ms=wait_ms, max_batch_sessions=16)
    return w


def test_waits_for_other_open_sessions_then_runs_them_together():
    async def run() -> tuple[list[str], float]:
        w = _worker(open_sessions=3, wait_ms=50)
        pending = deque([_step("s0")])
        loop = asyncio.get_running_loop()
        loop.call_later(0.005, w.queue.put_nowait, _step("s1"))
        loop.call_later(0.010, w.queue.put_nowait, _step("s2"))
        t0 = time.perf_counter()
        await w._gather(pending)
        return [s.inp.session_ids[0] for s in pending], time.perf_counter() - t0

    sids, took = asyncio.run(run())
    assert sids == ["s0", "s1", "s2"]
    assert took < 0.045  # returned as soon as every open session had a step, not at the deadline


def test_lone_session_and_zero_wait_run_at_once():
    async def run(open_sessions: int, wait_ms: float) -> float:
        w = _worker(open_sessions, wait_ms)
        t0 = time.perf_counter()
        await w._gather(deque([_step("s0")]))
        return time.perf_counter() - t0

    assert asyncio.run(run(1, 50)) < 0.005
    assert asyncio.run(run(4, 0)) < 0.005
    assert 0.015 < asyncio.run(run(4, 20)) < 0.1  # the others never came: the wait is bounded
