"""Peers that are not the market's broker try to use a worker for free, or crowd out others.

One real worker process (a two-layer tiny model, one stage) on a real Anvil with the market
deployed; it checks BROKER_ROLE on the JobMarket. A stranger peer opens sessions with no ticket,
with a ticket it signed itself, with an expired one and with the broker's ticket issued to another
peer: every open is refused before any work and uses no slot. Then a second driver of the broker
floods sessions: it cannot hold more than its per-opener limit, and its transcripts never push out
the first driver's.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "integration" / "node"))
from node_helpers import Swarm, tiny_shards, wait_for_spans  # type: ignore[import-not-found]

from dlis_market.chain.devnet import LocalMarket
from dlis_market.node.driver import JobSpec, PipelineDriver
from dlis_market.node.errors import RemoteError
from dlis_market.node.protocol import OpenBody
from dlis_market.protocol.routes import RouteHop
from dlis_market.settings import NodeSettings

MODEL = "tiny-paid"
PER_OPENER = 3


def settings_for(market: LocalMarket) -> NodeSettings:
    dep = market.client.deployment
    return NodeSettings(
        chain_id=market.client.chain_id, market_address=dep.address_of("JobMarket"),
        registry_address=dep.address_of("NodeRegistry"), step_timeout_s=30.0, request_timeout_s=15.0,
    )  # fmt: skip


def open_body(job_id: bytes, reply_to: str, ticket: dict[str, Any] | None = None) -> dict[str, Any]:
    body = OpenBody(
        session_id=f"s-{secrets.token_hex(6)}", model=MODEL, start=0, end=2, max_length=16, job_id=job_id,
        reply_to=reply_to, next_peer=None,
    ).model_dump()  # fmt: skip
    if ticket is not None:
        body["ticket"] = ticket
    return body


async def free_slots(driver: PipelineDriver, peer: str) -> int:
    info = await driver.pool.request(peer, "info", {}, 10)
    return int(info["record"]["free_slots"])


def test_strangers_cannot_open_sessions_and_one_opener_cannot_crowd_out_another(
    market: LocalMarket, tmp_path: Path
) -> None:
    shards = tiny_shards(tmp_path, [(0, 2)], name=MODEL)
    dep = market.client.deployment
    env = {
        "DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url,
        "DLIS_NODE__MAX_SESSIONS_PER_OPENER": str(PER_OPENER),
        "DLIS_NODE__TRANSCRIPT_RETAIN_BYTES": "400",  # a few small transcripts (8 bytes per token)
        "DLIS_NODE__TRANSCRIPT_BYTES_PER_OPENER": "200",
    }
    chain = ["--market", dep.address_of("JobMarket"), "--registry", dep.address_of("NodeRegistry")]
    chain += ["--chain-id", str(market.client.chain_id), "--publisher", market.deployer.address]
    with Swarm(tmp_path / "swarm", env=env) as swarm:
        worker = swarm.start_worker(shards, "0:2", "w", *chain)
        settings = settings_for(market)

        async def run() -> None:
            broker_key = bytes(market.broker.key)
            honest = await PipelineDriver.create(swarm.initial_peers, settings, broker_key)
            stranger = await PipelineDriver.create(swarm.initial_peers, settings)  # its own key: no BROKER_ROLE
            flooder = await PipelineDriver.create(swarm.initial_peers, settings, broker_key)
            drivers = [honest, stranger, flooder]
            try:
                await wait_for_spans(honest, MODEL, 1)
                peer = worker.peer_id
                slots = await free_slots(stranger, peer)

                # 1. no ticket at all
                job = secrets.token_bytes(32)
                with pytest.raises(RemoteError, match="no session ticket"):
                    await stranger.pool.request(peer, "open", open_body(job, stranger.peer_id), 10)
                assert await free_slots(stranger, peer) == slots

                record = (await honest.discover(MODEL))[0]
                # the share is announced in the signed record, so a broker's scheduler plans within it
                assert record.opener_slots == PER_OPENER
                route_hop = RouteHop.of(record)
                # 2. a ticket the stranger signed itself (valid signature, not a broker)
                with pytest.raises(RemoteError, match="holds no BROKER_ROLE"):
                    body = open_body(job, stranger.peer_id, stranger.ticket(job, MODEL, route_hop))
                    await stranger.pool.request(peer, "open", body, 10)
                # 3. the broker's ticket, issued to the honest driver, replayed by the stranger
                stolen = honest.ticket(job, MODEL, route_hop)
                with pytest.raises(RemoteError, match="names opener"):
                    await stranger.pool.request(peer, "open", open_body(job, stranger.peer_id, stolen), 10)
                # 4. a forged ticket: the broker's, with the opener rewritten
                forged = {**stolen, "ticket": {**stolen["ticket"], "opener": stranger.peer_id}}
                with pytest.raises(RemoteError, match="holds no BROKER_ROLE"):
                    await stranger.pool.request(peer, "open", open_body(job, stranger.peer_id, forged), 10)
                # 5. an expired broker ticket for the right opener
                expired = {**stolen, "ticket": {**stolen["ticket"], "expires_at": time.time() - 1}}
                with pytest.raises(RemoteError, match="expired"):
                    await honest.pool.request(peer, "open", open_body(job, honest.peer_id, expired), 10)
                assert await free_slots(stranger, peer) == slots, "a refused open took a slot"

                # The honest driver's paid job runs; its transcript is kept for spot checks.
                session = await honest.open_job(JobSpec(model=MODEL, prompt_ids=[1, 2, 3, 4, 5], max_new_tokens=3))
                [t async for t in session.tokens()]
                kept_sid = session.session_id
                assert len(await session.close()) == 1
                await honest.pool.request(peer, "transcript", {"session_id": kept_sid}, 10)

                # 6. the flooder's transcripts never push out another opener's, however many it runs ...
                for _ in range(8):  # 8 x 8 tokens x 8 bytes: over the whole 400-byte store
                    await flooder.generate(JobSpec(model=MODEL, prompt_ids=[5, 4, 3, 2, 1], max_new_tokens=3))
                got = await honest.pool.request(peer, "transcript", {"session_id": kept_sid}, 10)
                assert got["session_id"] == kept_sid
                # ... and it holds at most PER_OPENER open sessions
                for _ in range(PER_OPENER):
                    j = secrets.token_bytes(32)
                    body = open_body(j, flooder.peer_id, flooder.ticket(j, MODEL, route_hop))
                    await flooder.pool.request(peer, "open", body, 10)
                j = secrets.token_bytes(32)
                with pytest.raises(RemoteError, match=f"already holds {PER_OPENER} sessions"):
                    body = open_body(j, flooder.peer_id, flooder.ticket(j, MODEL, route_hop))
                    await flooder.pool.request(peer, "open", body, 10)
                assert await free_slots(honest, peer) == slots - PER_OPENER

                # 7. an opener that goes away without closing frees its slots within seconds
                await flooder.close()
                drivers.remove(flooder)
                gone = time.monotonic()
                while await free_slots(honest, peer) != slots:
                    assert time.monotonic() - gone < 10, "the departed opener's sessions still hold slots"
                    await asyncio.sleep(0.2)
                print(f"slots freed {time.monotonic() - gone:.1f}s after the opener left")
            finally:
                for d in drivers:
                    await d.close()

        asyncio.run(run())
