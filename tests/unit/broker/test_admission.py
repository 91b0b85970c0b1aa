"""The broker's admission queue on its own: FIFO hand-over, its two bounds, and no slot lost when
a waiting requester leaves."""

from __future__ import annotations

import asyncio
import time

import pytest

from dlis_market.broker.admission import AdmissionQueue
from dlis_market.broker.errors import Overloaded


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_slots_are_handed_over_in_order():
    async def scenario() -> list[int]:
        q = AdmissionQueue(slots=1, max_waiting=5, wait_s=5)
        far = time.monotonic() + 5
        await q.acquire(far)
        order: list[int] = []

        async def waiter(i: int) -> None:
            await q.acquire(far)
            order.append(i)
            q.release()

        tasks = [asyncio.create_task(waiter(i)) for i in range(4)]
        await asyncio.sleep(0)
        assert q.waiting == 4 and q.running == 1
        q.release()
        await asyncio.gather(*tasks)
        assert q.running == 0 and q.waiting == 0
        return order

    assert run(scenario()) == [0, 1, 2, 3]


def test_full_line_and_long_wait_are_refused_with_retry_after():
    async def scenario() -> None:
        q = AdmissionQueue(slots=1, max_waiting=1, wait_s=0.05)
        await q.acquire(time.monotonic() + 1)
        waiting = asyncio.create_task(q.acquire(time.monotonic() + 0.05))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as full:
            await q.acquire(time.monotonic() + 1)
        assert "the most the queue holds" in str(full.value) and full.value.retry_after_s >= 1
        with pytest.raises(Overloaded) as late:
            await waiting
        assert "no job slot freed within" in str(late.value) and late.value.retry_after_s >= 1
        assert q.waiting == 0 and q.running == 1

    run(scenario())


def test_a_requester_leaving_the_line_loses_no_slot():
    async def scenario() -> None:
        q = AdmissionQueue(slots=1, max_waiting=3, wait_s=5)
        far = time.monotonic() + 5
        await q.acquire(far)
        leaver = asyncio.create_task(q.acquire(far))
        stayer = asyncio.create_task(q.acquire(far))
        await asyncio.sleep(0)
        q.release()  # handed to the leaver, who is cancelled before it runs: it passes the slot on
        leaver.cancel()
        await stayer
        assert q.running == 1 and q.waiting == 0
        q.release()
        assert q.running == 0

    run(scenario())
