"""A broker reuses a recent discovery: jobs arriving within ``discovery_max_age_s`` share one DHT
lookup, concurrent ones join the lookup in flight, and a lookup that asks for fresh records
(a failover) never gets an old answer."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from dlis_market.node.driver import PipelineDriver
from dlis_market.settings import NodeSettings


class CountingDht:
    """Stands in for the DHT lookup (what this test is about is the driver's reuse of it)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.delay_s = delay_s
        self.fail = False
        self.lock = threading.Lock()

    def __call__(self, model: str) -> list[Any]:
        with self.lock:
            self.calls += 1
            n = self.calls
        time.sleep(self.delay_s)
        if self.fail:
            raise ConnectionError("the DHT did not answer")
        return [SimpleNamespace(peer_id=f"peer-{n}", started_at=float(n))]


def _driver(lookup: CountingDht) -> PipelineDriver:
    pool = SimpleNamespace(peer_id="driver", dead_peer_callbacks=[])
    driver = PipelineDriver(dht=None, pool=pool, settings=NodeSettings())  # type: ignore[arg-type]
    driver._discover = lookup  # type: ignore[method-assign]
    return driver


def test_jobs_within_the_age_share_one_lookup_and_later_ones_look_again() -> None:
    lookup = CountingDht()
    driver = _driver(lookup)

    async def run() -> None:
        first = await driver.discover("m", max_age_s=0.3)
        again = await driver.discover("m", max_age_s=0.3)
        assert lookup.calls == 1 and [s.peer_id for s in again] == [s.peer_id for s in first] == ["peer-1"]
        again.clear()  # a caller's list is its own
        assert [s.peer_id for s in await driver.discover("m", max_age_s=0.3)] == ["peer-1"]
        await asyncio.sleep(0.35)
        assert [s.peer_id for s in await driver.discover("m", max_age_s=0.3)] == ["peer-2"]
        assert lookup.calls == 2
        # a fresh lookup (failover, spot check) ignores the one just made, and updates it
        assert [s.peer_id for s in await driver.discover("m")] == ["peer-3"]
        assert [s.peer_id for s in await driver.discover("m", max_age_s=0.3)] == ["peer-3"]
        assert [s.peer_id for s in await driver.discover("other", max_age_s=0.3)] == ["peer-4"]

    asyncio.run(run())


def test_a_burst_of_jobs_joins_the_lookup_in_flight() -> None:
    lookup = CountingDht(delay_s=0.2)
    driver = _driver(lookup)

    async def run() -> list[list[Any]]:
        return await asyncio.gather(*(driver.discover("m", max_age_s=1.0) for _ in range(16)))

    answers = asyncio.run(run())
    assert lookup.calls == 1
    assert {a[0].peer_id for a in answers} == {"peer-1"}


def test_a_failed_lookup_fails_every_waiter_and_is_not_kept() -> None:
    lookup = CountingDht(delay_s=0.1)
    lookup.fail = True
    driver = _driver(lookup)

    async def run() -> None:
        results = await asyncio.gather(*(driver.discover("m", max_age_s=1.0) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results) and lookup.calls == 1
        lookup.fail = False
        assert [s.peer_id for s in await driver.discover("m", max_age_s=1.0)] == ["peer-2"]

    asyncio.run(run())


def test_a_cancelled_job_does_not_cancel_the_lookup_others_wait_on() -> None:
    lookup = CountingDht(delay_s=0.2)
    driver = _driver(lookup)

    async def run() -> None:
        leaving = asyncio.create_task(driver.discover("m", max_age_s=1.0))
        staying = asyncio.create_task(driver.discover("m", max_age_s=1.0))
        await asyncio.sleep(0.05)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert [s.peer_id for s in await staying] == ["peer-1"] and lookup.calls == 1
        assert [s.peer_id for s in await driver.discover("m", max_age_s=1.0)] == ["peer-1"]  # and kept

    asyncio.run(run())
