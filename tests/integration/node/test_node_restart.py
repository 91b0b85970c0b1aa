"""A stage that crashed is banned; when it comes back (a signed announcement of a new start) the
ban ends at once, well before the ban would have run out, and jobs route through it again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from node_helpers import Swarm, _wait_ready, driver_settings, tiny_shards, wait_for_spans  # type: ignore[import-not-found]

from dlis_market.chain.anvil import free_port
from dlis_market.errors import NodeError
from dlis_market.node.driver import JobSpec, PipelineDriver

MODEL = "tiny-restart"
BAN_S = 120.0  # far longer than the test: only the restart can lift it


def test_restarted_middle_stage_is_routed_again_within_an_announce_interval(tmp_path: Path) -> None:
    shards = tiny_shards(tmp_path, [(0, 2), (2, 4), (4, 6)], name=MODEL)
    port = str(free_port())
    with Swarm(tmp_path / "swarm") as swarm:
        a = swarm.launch(shards, "0:2", "a")
        b = swarm.launch(shards, "2:4", "b", "--port", port)  # same address after the restart
        c = swarm.launch(shards, "4:6", "c")
        for w in (a, b, c):
            w.info = _wait_ready(w.proc, 240, w.log_path)

        async def run() -> None:
            driver = await PipelineDriver.create(swarm.initial_peers, driver_settings(ban_base_s=BAN_S))
            try:
                await wait_for_spans(driver, MODEL, 3)
                spec = JobSpec(model=MODEL, prompt_ids=[1, 2, 3], max_new_tokens=3)
                await driver.generate(spec)
                before = next(s for s in await driver.discover(MODEL) if s.peer_id == b.peer_id).started_at

                b.kill()  # a crash: no withdrawal, its record stays on the DHT until its TTL
                with pytest.raises(NodeError):
                    await driver.generate(spec)
                assert b.peer_id in driver.banned()

                restarted = swarm.start_worker(shards, "2:4", "b", "--port", port)
                assert restarted.peer_id == b.peer_id
                ready = time.monotonic()
                while time.monotonic() - ready < 30:
                    spans = await driver.discover(MODEL)
                    if any(s.peer_id == b.peer_id and s.started_at > before for s in spans):
                        break
                    await asyncio.sleep(0.2)
                lifted_after = time.monotonic() - ready
                assert b.peer_id not in driver.banned(), "the restart did not lift the ban"
                print(f"ban lifted {lifted_after:.1f}s after the restarted worker was ready")
                assert lifted_after < 2.0 + 8.0  # announce_every_s is 2 s here; slack for 2 shared cores
                _, got = await driver.generate(spec)
                assert b.peer_id in {r.peer_id for r in got}
            finally:
                await driver.close()

        asyncio.run(run())
