"""A client's first layer on secret-shared activations (node/shared_layers.py), through real P2P
workers: the client embeds its tokens and runs the layer's norms, attention and activation itself,
and each of the layer's seven projections goes as two additive shares to two workers that serve
layer 0. The hidden state after the layer equals the model's own within the fixed-point error, for
a prefill and decode steps on the client's KV cache; a worker answers only under a ticket for the
job, for the layers it serves.

A privacy=high job through the driver (``node/private_entry.py``): the driver runs the first stage
on shares and the route starts after it; greedy tokens equal the model's, both share workers sign a
receipt for the positions they served, a share worker killed mid-job is replaced and the step runs
again without being billed twice.

Tiny Llama (hidden 32, fp32): ``a``, ``b`` and ``d`` serve [0, 1) (share workers), ``c`` [1, 2).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from node_helpers import Swarm, _wait_ready, driver_settings, tiny_fp32_shards, wait_for_spans

from dlis_market.broker.job_types import covering_receipts
from dlis_market.inference.messages import decode
from dlis_market.inference.stage import Stage
from dlis_market.node import receipts
from dlis_market.node.driver import JobSpec, PipelineDriver
from dlis_market.node.errors import RemoteError
from dlis_market.node.private_entry import PrivateEntry
from dlis_market.node.shared_layers import PrivateLayers, ShareLinearBody
from dlis_market.protocol.pricing import stage_charge
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import RouteHop

MODEL = "tiny-private"
PROMPT = [7, 3, 41, 12, 5]
JOB = b"\x0b" * 32


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("shared-layer")
    model_dir, shards = tiny_fp32_shards(root, MODEL, split=1, layers=2)
    with Swarm(root / "swarm") as sw:
        layout = (("a", "0:1"), ("b", "0:1"), ("c", "1:2"), ("d", "0:1"))
        workers = {name: sw.launch(shards, layers, name) for name, layers in layout}
        for w in workers.values():
            w.info = _wait_ready(w.proc, 240, w.log_path)
        yield {"swarm": sw, "workers": workers, "shards": shards, "model_dir": model_dir}


def hop(w: Any) -> RouteHop:
    return RouteHop(w.peer_id, w.info["node_address"], w.info["start"], w.info["end"], 10**12)


def body(
    driver: PipelineDriver, w: Any, layer: int, projection: str, rows: int, share: bytes, job=JOB, position: int = 0
) -> dict:
    return ShareLinearBody(
        model=MODEL, start=w.info["start"], end=w.info["end"], job_id=job, ticket=driver.ticket(job, MODEL, hop(w)),
        layer=layer, projection=projection, position=position, rows=rows, share=share,
    ).model_dump()  # fmt: skip


def test_the_first_layer_on_shares_equals_the_models_and_needs_a_ticket(world: dict[str, Any]) -> None:
    a, b, c = (world["workers"][n] for n in ("a", "b", "c"))
    model = AutoModelForCausalLM.from_pretrained(world["model_dir"], dtype=torch.float32).eval()

    async def run() -> None:
        driver = await PipelineDriver.create(world["swarm"].initial_peers, driver_settings())
        try:
            await wait_for_spans(driver, MODEL, 4)

            sent: list[tuple[str, bytes, bytes]] = []  # (projection, share to a, share to b) of every call
            fail_at: list[int | None] = [None]  # the call number at which worker b is gone

            async def call(layer: int, projection: str, position: int, rows: int, share_a: bytes, share_b: bytes):
                sent.append((projection, share_a, share_b))
                if fail_at[0] == len(sent):
                    raise RemoteError("worker b is gone", "gone")
                got_a, got_b = await asyncio.gather(*(
                    driver.pool.request(
                        w.peer_id, "share_linear", body(driver, w, layer, projection, rows, x, position=position), 30
                    )
                    for w, x in ((a, share_a), (b, share_b))
                ))  # fmt: skip
                return bytes(got_a["out"]), bytes(got_b["out"]), int(got_a["cols"])

            private = PrivateLayers(Stage.load(world["shards"], index=0), call, asyncio.get_running_loop())
            ids, worst, took = list(PROMPT), 0.0, []
            step = torch.tensor([ids])
            for i in range(4):  # the prompt, then three greedy steps on the client's KV cache
                if i == 2:  # q, k and v go out, o_proj fails: the cache is cut back and the step runs again
                    calls_before, fail_at[0] = private.calls, len(sent) + 4
                    with pytest.raises(RemoteError, match="gone"):
                        await asyncio.to_thread(private.forward, step)
                    assert private.position == len(ids) - 1 and private.calls == calls_before + 3
                began = time.perf_counter()
                got = await asyncio.to_thread(private.forward, step)
                took.append(time.perf_counter() - began)
                with torch.no_grad():
                    out = model(torch.tensor([ids]), output_hidden_states=True)
                want = out.hidden_states[1][:, -got.shape[1] :]  # after layer 0
                worst = max(worst, float((got - want).abs().max()))
                ids.append(int(out.logits[0, -1].argmax()))
                step = torch.tensor([ids[-1:]])
            assert worst < 1e-3, worst  # fixed point at 2^-18
            print(f"private layer 0: worst error {worst:.2e}; prefill {took[0] * 1e3:.1f} ms, decode steps "
                  f"{', '.join(f'{t * 1e3:.1f}' for t in took[1:])} ms; {private.bytes_sent} share bytes")  # fmt: skip
            assert private.calls == 4 * 7 + 3  # seven projections per step, each to both workers (+3 of the failed)
            # what each worker received: uniform ring elements, fresh every call, never the activations. A
            # fixed-point encoding of activations (|x| < 2^40) has bits 40-63 all equal to its sign bit;
            # a uniform element has bit 50 differ from bit 63 half the time
            for side in (1, 2):
                words = np.concatenate([np.frombuffer(call[side], dtype="<u8") for call in sent])
                mixed = ((words >> np.uint64(50)) & np.uint64(1)) != (words >> np.uint64(63))
                assert abs(float(mixed.mean()) - 0.5) < 0.05, (side, float(mixed.mean()))
            q_shares = [x for p, x, _ in sent if p == "q_proj"]
            assert len(set(q_shares)) == len(q_shares)
            for _, x, y in sent:  # the shares add up to the encoded activations, which neither equals
                total = (np.frombuffer(x, dtype="<i8") + np.frombuffer(y, dtype="<i8")).astype("<i8")
                assert np.abs(total).max() < 2**40 and total.tobytes() not in (x, y)

            # no ticket, or a ticket for another range: refused; a worker that does not serve layer 0: refused
            unticketed = {**body(driver, a, 0, "q_proj", 1, bytes(8 * 32)), "ticket": None}
            with pytest.raises(RemoteError, match="ticket"):
                await driver.pool.request(a.peer_id, "share_linear", unticketed, 30)
            elsewhere = {**body(driver, a, 0, "q_proj", 1, bytes(8 * 32)), "ticket": driver.ticket(JOB, MODEL, hop(c))}
            with pytest.raises(RemoteError, match="ticket"):
                await driver.pool.request(a.peer_id, "share_linear", elsewhere, 30)
            with pytest.raises(RemoteError, match="not one of"):
                await driver.pool.request(
                    a.peer_id, "share_linear", body(driver, a, 0, "lm_head", 1, bytes(8 * 32)), 30
                )
            with pytest.raises(RemoteError, match="layer 0 is not in this stage's range"):
                await driver.pool.request(c.peer_id, "share_linear", body(driver, c, 0, "q_proj", 1, bytes(8 * 32)), 30)
            with pytest.raises(RemoteError, match="int64 values"):
                await driver.pool.request(a.peer_id, "share_linear", body(driver, a, 0, "q_proj", 2, bytes(8 * 32)), 30)
            for w in (a, b):  # the work is billed: the positions the first projection reached
                got = await driver.pool.request(w.peer_id, "share_close", {"job_id": JOB}, 15)
                assert receipts.from_wire(got["receipt"]).receipt.tokens == len(ids) - 1
        finally:
            await driver.close()

    asyncio.run(run())


async def free_slots(driver: PipelineDriver, peer: str) -> int:
    """The free slots of the span record the worker would announce now (``info``)."""
    return int((await driver.pool.request(peer, "info", {}, 15))["record"]["free_slots"])


def greedy(world: dict[str, Any], new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(world["model_dir"], dtype=torch.float32).eval()
    ids = list(PROMPT)
    with torch.no_grad():  # no stop token: the jobs here run to max_new_tokens
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(PROMPT) :]


def private_spec(world: dict[str, Any], job_id: bytes, new_tokens: int) -> JobSpec:
    entry = PrivateEntry(Stage.load(world["shards"], index=0))
    return JobSpec(MODEL, list(PROMPT), new_tokens, job_id=job_id, num_layers=2, private=entry)


def check_share_receipts(got: list[StageReceipt], pair: list[Any], served: int, joined: dict[str, int]) -> None:
    """Two share receipts, ascending node address, each billing the positions it served at its
    price (from the one it joined at to the prompt + every new token but the last), then the rest
    of the route's receipt."""
    shares = [r for r in got if r.share]
    assert [r.peer_id for r in shares] == sorted((w.peer_id for w in pair), key=lambda p: int(
        next(w for w in pair if w.peer_id == p).info["node_address"], 16))  # fmt: skip
    assert [int(r.node, 16) for r in shares] == sorted(int(r.node, 16) for r in shares)
    for r in shares:
        tokens = served - joined.get(r.peer_id, 0)
        assert (r.start, r.end, r.tokens) == (0, 1, tokens), (r.peer_id, r.tokens, tokens)
        assert r.amount == stage_charge(10**12, tokens) and r.signed.receipt.job_id == got[0].signed.receipt.job_id
    rest = [r for r in got if not r.share]
    assert [(r.start, r.end) for r in rest] == [(1, 2)] and rest[0].tokens == served
    assert covering_receipts(got, 2) == [*shares, rest[0]]  # the order JobMarket pays a shared range in


def test_a_private_job_runs_its_first_stage_on_shares_and_pays_both_workers(world: dict[str, Any]) -> None:
    workers = world["workers"]
    new_tokens = 6
    want = greedy(world, new_tokens)

    async def run() -> tuple[list[int], list[StageReceipt], list[str], list[tuple[str, Any]]]:
        driver = await PipelineDriver.create(world["swarm"].initial_peers, driver_settings())
        other = await PipelineDriver.create(world["swarm"].initial_peers, driver_settings())
        steps: list[tuple[str, Any]] = []  # (peer, decoded input) of every step the driver sent
        send = driver.pool.send

        async def spy(peer: str, op: str, body: dict[str, Any]) -> None:
            if op == "step":
                steps.append((peer, decode(body["input"])))
            await send(peer, op, body)

        driver.pool.send = spy  # type: ignore[method-assign]
        try:
            await wait_for_spans(driver, MODEL, 4)
            job = b"\x0c" * 32
            session = await driver.open_job(private_spec(world, job, new_tokens))
            assert [(h.start, h.end) for h in session.route] == [(1, 2)]  # the route starts after the entry
            assert session.shares is not None
            pair = [h.peer_id for h in session.shares.hops]
            idle = {p: await free_slots(driver, p) for p in pair}
            tokens = [t async for t in session.tokens()]
            # share work takes no KV slot, but the span record counts it as load while it runs
            assert {p: await free_slots(driver, p) for p in pair} == {p: n - 1 for p, n in idle.items()}
            for peer in pair:  # another caller cannot take the job's receipt
                with pytest.raises(RemoteError, match="no shared projections"):
                    await other.pool.request(peer, "share_close", {"job_id": job}, 15)
            got = await session.close()
            assert {p: await free_slots(driver, p) for p in pair} == idle  # closed: no longer load
            for peer in pair:  # a receipt is signed once
                with pytest.raises(RemoteError, match="no shared projections"):
                    await driver.pool.request(peer, "share_close", {"job_id": job}, 15)
            return tokens, got, pair, steps
        finally:
            await other.close()
            await driver.close()

    tokens, got, pair, steps = asyncio.run(run())
    assert tokens == want
    # what left the driver for the route: hidden states after layer 0, to c only, never token ids
    assert [peer for peer, _ in steps] == [workers["c"].peer_id] * new_tokens
    assert all(inp.token_ids is None and inp.hidden is not None and inp.hidden.shape[-1] == 32 for _, inp in steps)
    by_peer = {w.peer_id: w for w in workers.values()}
    assert all(by_peer[p].info["start"] == 0 for p in pair) and len(set(pair)) == 2
    check_share_receipts(got, [by_peer[p] for p in pair], len(PROMPT) + new_tokens - 1, {})


def test_a_share_worker_killed_mid_job_is_replaced_and_the_answer_is_unchanged(world: dict[str, Any]) -> None:
    workers = world["workers"]
    new_tokens = 8
    want = greedy(world, new_tokens)

    async def run() -> tuple[list[int], list[StageReceipt], list[str], list[str], int, dict[str, int]]:
        driver = await PipelineDriver.create(world["swarm"].initial_peers, driver_settings())
        try:
            await wait_for_spans(driver, MODEL, 4)
            session = await driver.open_job(private_spec(world, b"\x0d" * 32, new_tokens))
            assert session.shares is not None
            first = [h.peer_id for h in session.shares.hops]
            victim = first[0]
            tokens: list[int] = []
            async for t in session.tokens():
                tokens.append(t)
                if len(tokens) == 3:
                    next(w for w in workers.values() if w.peer_id == victim).kill()
            pair = [h.peer_id for h in session.shares.hops]
            joined = dict(session.shares.joined)
            return tokens, await session.close(), first, pair, session.shares.replaced, joined
        finally:
            await driver.close()

    tokens, got, first, pair, replaced, joined = asyncio.run(run())
    assert tokens == want
    (new,) = set(pair) - set(first)  # the third first-stage worker replaced the victim
    assert replaced == 1 and first[0] not in pair and first[1] in pair
    # the replacement joined at the step after the third token and bills from there; the survivor
    # served the failed step's first calls too and bills each position once
    assert joined[new] == len(PROMPT) + 2 and joined[first[1]] == 0
    by_peer = {w.peer_id: w for w in workers.values()}
    check_share_receipts(got, [by_peer[p] for p in pair], len(PROMPT) + new_tokens - 1, joined)
