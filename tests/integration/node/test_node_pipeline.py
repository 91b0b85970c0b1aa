"""Workers in separate processes on loopback: exact greedy tokens, batching, refusals, failover."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import msgpack
import pytest
import torch
from hivemind.p2p import PeerID
from node_helpers import MODEL, PASSWORD, TinySwarm, driver_settings, wait_for_spans  # type: ignore[import-not-found]
from transformers import AutoModelForCausalLM

from dlis_market.chain.job_market import receipt_signer
from dlis_market.inference.messages import StageInput, encode
from dlis_market.node import identity
from dlis_market.node.driver import JobSpec, PipelineDriver
from dlis_market.node.errors import NoRouteError
from dlis_market.node.protocol import PROTOCOL_NAME, pack_frame
from dlis_market.protocol.spans import SpanRecord

PROMPT = [1, 2, 3, 4, 5]
NEW = 12


def hf_tokens(model_dir: Path, prompt: list[int], new: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0)
    return [int(t) for t in out[0, len(prompt) :]]


async def _driver(s: TinySwarm) -> PipelineDriver:
    driver = await PipelineDriver.create(s.swarm.initial_peers, driver_settings())
    await wait_for_spans(driver, MODEL, 4)
    return driver


def test_auto_worker_chose_the_unserved_range(tiny_swarm: TinySwarm) -> None:
    assert (tiny_swarm.workers["c"].info["start"], tiny_swarm.workers["c"].info["end"]) == (4, 6)


def test_greedy_tokens_through_three_workers_equal_transformers(tiny_swarm: TinySwarm) -> None:
    expected = hf_tokens(tiny_swarm.shards.parent / "model", PROMPT, NEW)

    async def run() -> None:
        driver = await _driver(tiny_swarm)
        try:
            job_id = secrets.token_bytes(32)
            tokens, receipts = await driver.generate(
                JobSpec(model=MODEL, prompt_ids=PROMPT, max_new_tokens=NEW, job_id=job_id)
            )
            assert tokens == expected
            assert [(r.signed.receipt.start, r.signed.receipt.end) for r in receipts] == [(0, 2), (2, 4), (4, 6)]
            # Each stage's attestation was verified before its session; its node key signed the receipt.
            for r in receipts:
                worker = next(w for w in tiny_swarm.workers.values() if w.peer_id == r.peer_id)
                assert driver.verified_node(r.peer_id) == worker.info["node_address"]
                keys = identity.load_or_create(worker.home / "node", PASSWORD, 1024, worker.home / "keystore")
                assert (keys.peer_id, keys.address) == (worker.peer_id, worker.info["node_address"])
            for r in receipts:  # every stage processed prompt + all but the last token, and signed it
                assert r.signed.receipt.job_id == job_id
                assert r.signed.receipt.tokens == len(PROMPT) + NEW - 1
                assert receipt_signer(driver.market, r.signed.receipt, r.signed.signature.signature)
        finally:
            await driver.close()

    asyncio.run(run())


def test_concurrent_sessions_are_batched_and_each_exact(tiny_swarm: TinySwarm) -> None:
    prompts = [PROMPT, [7, 8, 9, 10, 11], [3, 1, 4, 1, 5]]
    expected = [hf_tokens(tiny_swarm.shards.parent / "model", p, 8) for p in prompts]

    async def run() -> list[list[int]]:
        driver = await _driver(tiny_swarm)
        try:
            jobs = [driver.generate(JobSpec(model=MODEL, prompt_ids=p, max_new_tokens=8)) for p in prompts]
            return [tokens for tokens, _ in await asyncio.gather(*jobs)]
        finally:
            await driver.close()

    assert asyncio.run(run()) == expected


async def _raw_stream(driver: PipelineDriver, peer: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    _, reader, writer = await driver.pool.p2p.call_binary_stream_handler(PeerID.from_base58(peer), PROTOCOL_NAME)
    return reader, writer


async def _read_error(reader: asyncio.StreamReader) -> dict[str, object]:
    size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 30), "big")
    env = msgpack.unpackb(await reader.readexactly(size))
    assert env["op"] == "error", env
    return dict(env["body"])


def test_bad_inputs_are_refused_and_the_worker_keeps_serving(tiny_swarm: TinySwarm) -> None:
    first = tiny_swarm.workers["a"]
    expected = hf_tokens(tiny_swarm.shards.parent / "model", PROMPT, 4)

    async def run() -> None:
        driver = await _driver(tiny_swarm)
        try:
            # A session that stays open across the bad inputs must be unaffected by them.
            session = await driver.open_job(JobSpec(model=MODEL, prompt_ids=PROMPT, max_new_tokens=4))
            stream = session.tokens()
            got = [await anext(stream)]

            reader, writer = await _raw_stream(driver, first.peer_id)
            writer.write((7).to_bytes(4, "big") + b"\xc1garbag")  # 0xc1 is never valid msgpack
            writer.write(b"")
            await writer.drain()
            assert "msgpack" in str((await _read_error(reader))["message"])

            reader, writer = await _raw_stream(driver, first.peer_id)
            writer.write((1 << 30).to_bytes(4, "big"))  # announces a 1 GiB frame: refused unread
            await writer.drain()
            assert "over the" in str((await _read_error(reader))["message"])

            reader, writer = await _raw_stream(driver, first.peer_id)
            bad = StageInput(("no-such-session",), (0,), 0, token_ids=torch.tensor([[1, 2]]))
            writer.write(pack_frame("step", {"input": encode(bad), "reply_to": driver.peer_id}, max_bytes=1 << 20))
            await writer.drain()
            assert "not open" in str((await _read_error(reader))["message"])

            writer.write(pack_frame("step", {"input": b"\x00" * 10, "reply_to": driver.peer_id}))
            await writer.drain()
            assert "message" in str((await _read_error(reader))["message"])

            got += [t async for t in stream]
            await session.close()
            assert got == expected
            assert first.proc.poll() is None
        finally:
            await driver.close()

    asyncio.run(run())


def test_a_range_the_worker_does_not_serve_is_refused_and_routed_around(tiny_swarm: TinySwarm) -> None:
    """Replica ``b2`` serves [2, 4); a record saying it serves [4, 6) faster than anyone is refused."""
    liar = tiny_swarm.workers["b2"]
    expected = hf_tokens(tiny_swarm.shards.parent / "model", PROMPT, 4)

    async def run() -> None:
        driver = await _driver(tiny_swarm)
        try:
            real = [s for s in await driver.discover(MODEL) if s.peer_id != liar.peer_id]
            honest = next(s for s in await driver.discover(MODEL) if s.peer_id == liar.peer_id)
            lie = honest.model_copy(update={"start": 4, "end": 6, "throughput": 1e9})

            async def lying_swarm(model: str) -> list[SpanRecord]:
                return [*real, lie]

            driver.discover = lying_swarm  # type: ignore[method-assign]
            session = await driver.open_job(JobSpec(model=MODEL, prompt_ids=PROMPT, max_new_tokens=4))
            tokens = [t async for t in session.tokens()]
            await session.close()
            assert tokens == expected
            assert liar.peer_id in driver.banned()
            assert liar.peer_id not in {r.peer_id for r in session.receipts}
            assert liar.proc.poll() is None
        finally:
            await driver.close()

    asyncio.run(run())


def test_killed_stage_fails_over_to_its_replica_then_reports_missing_layers(tiny_swarm: TinySwarm) -> None:
    """Destructive, so last in this module: kills the [2, 4) workers one after the other."""
    expected = hf_tokens(tiny_swarm.shards.parent / "model", PROMPT, NEW)
    by_peer = {w.peer_id: w for w in tiny_swarm.workers.values()}

    async def run() -> None:
        driver = await _driver(tiny_swarm)
        try:
            session = await driver.open_job(JobSpec(model=MODEL, prompt_ids=PROMPT, max_new_tokens=NEW))
            stream = session.tokens()
            got = [await anext(stream) for _ in range(5)]
            victim = session.route[1]
            assert (victim.start, victim.end) == (2, 4)
            by_peer[victim.peer_id].kill()
            got += [t async for t in stream]
            receipts = await session.close()
            assert got == expected
            assert session.failovers == 1
            assert session.route == [] and victim.peer_id in driver.banned()
            assert {r.peer_id for r in receipts} >= {tiny_swarm.workers["a"].peer_id}

            replica = next(w for w in tiny_swarm.workers.values() if w.info["start"] == 2 and w.proc.poll() is None)
            replica.kill()
            with pytest.raises(NoRouteError, match=r"layers \[2, 4\)"):
                await driver.generate(JobSpec(model=MODEL, prompt_ids=PROMPT, max_new_tokens=2, num_layers=6))

            # A clean shutdown withdraws the announcement before its TTL runs out.
            last = tiny_swarm.workers["c"]
            assert last.peer_id in {s.peer_id for s in await driver.discover(MODEL)}
            assert last.stop() == 0
            assert last.peer_id not in {s.peer_id for s in await driver.discover(MODEL)}
        finally:
            await driver.close()

    asyncio.run(run())
    assert os.name == "posix"
