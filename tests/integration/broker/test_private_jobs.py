"""A privacy=high job through the broker's API: its first stage runs on secret shares at two
workers of different operators, and JobMarket pays both.

Everything is real: Anvil with the contracts, four worker processes staked and registered on
chain (``s1`` and ``s2`` serve the first stage [0, 2), each under its own operator; ``m`` [2, 4)
and ``c`` [4, 6)), `dlis broker start` over the P2P network, settlement on chain. The broker
plans the pair and the route after it (``planning.share_partner``), runs the first stage itself
(``node/private_entry.py``), and settles the job with both share receipts first, in ascending node
address, as JobMarket's rule for a shared range asks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from dlis_market.chain.anvil import free_port
from dlis_market.inference.manifest import MANIFEST_NAME, sha256_file
from tests.integration.node.node_helpers import Swarm, _wait_ready, paid_job, register_worker, start_broker, tiny_shards

UNIT = 10**18
MODEL = "tiny-private-jobs"
LAYOUT = {"s1": "0:2", "s2": "0:2", "m": "2:4", "c": "4:6"}
PROMPT = "The capital of France is"
MAX_TOKENS = 8


def settled(port: int, job_id: str, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 90
    while True:
        job: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] not in ("completed", "running"):
            assert job["status"] == "settled", (job["status"], job["error"], log.read_text()[-3000:])
            return job
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)


def test_a_private_job_is_answered_as_a_plain_one_and_pays_both_share_workers(
    market: Any, smollm2_shards: Path, tmp_path: Path
) -> None:
    dep = market.client.deployment
    tok = AutoTokenizer.from_pretrained(str(smollm2_shards))
    shards = tiny_shards(tmp_path / "model", [(0, 2), (2, 4), (4, 6)], name=MODEL, vocab_size=len(tok))
    tok.save_pretrained(str(shards))  # the broker tokenizes prompts with the model's tokenizer
    registry = market.registry()
    registry.publish_model(market.deployer, MODEL, "QmTiny", bytes.fromhex(sha256_file(shards / MANIFEST_NAME)), 6)
    jm = market.market()
    broker_proc = None
    log = tmp_path / "broker.log"
    with Swarm(tmp_path / "swarm", env={"DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}) as swarm:
        chain = ["--chain-id", "31337", "--market", dep.address_of("JobMarket"), "--registry"]
        chain += [dep.address_of("NodeRegistry")]
        workers = {name: swarm.launch(shards, layers, name, *chain) for name, layers in LAYOUT.items()}
        operators = {}
        for name, w in workers.items():
            w.info = _wait_ready(w.proc, 240, w.log_path)
            operators[name] = register_worker(market, w, attested=True)  # a fresh operator each
        swarm.wait_spans(MODEL, len(LAYOUT), registry=dep.address_of("NodeRegistry"))
        node = {n: w.info["node_address"] for n, w in workers.items()}
        try:
            port = free_port()
            broker_proc = start_broker(
                market, shards, swarm.initial_peers, port, 1, log,
                DLIS_BROKER__SPOT_CHECK_FRACTION="0", DLIS_BROKER__STANDING_CACHE_S="1",
            )  # fmt: skip
            client = market.new_funded_account(50 * UNIT)
            jm.deposit(client, 10 * UNIT)
            plain = paid_job(market, port, client, MODEL, PROMPT, MAX_TOKENS)
            settled(port, plain["id"], log)  # its payments land before the private job's are counted
            claim0 = {n: jm.claimable_of(a) for n, a in operators.items()}
            private = paid_job(market, port, client, MODEL, PROMPT, MAX_TOKENS, policy={"privacy": "high"})
            assert private["answer"] == plain["answer"] and private["completion_tokens"] == MAX_TOKENS

            job = settled(port, private["id"], log)
            receipts = [(r["node"], r["start"], r["end"], int(r["amount"])) for r in job["receipts"]]
            pair = sorted((node["s1"], node["s2"]), key=lambda a: int(a, 16))
            assert [r[:3] for r in receipts] == [(pair[0], 0, 2), (pair[1], 0, 2), (node["m"], 2, 4), (node["c"], 4, 6)]
            paid = {n: jm.claimable_of(a) - claim0[n] for n, a in operators.items()}
            billed = {r[0]: r[3] for r in receipts}
            for name in LAYOUT:  # both share workers and the stages after them: exactly their receipts
                assert paid[name] == billed[node[name]] > 0, (name, paid, billed)
            assert int(job["cost"]) == sum(billed.values())
        finally:
            if broker_proc is not None:
                broker_proc.terminate()
                broker_proc.wait(timeout=30)


def test_a_private_job_without_a_second_operator_is_refused_before_it_is_admitted(
    market: Any, smollm2_shards: Path, tmp_path: Path
) -> None:
    """One first-stage worker only: the broker refuses with a clear problem, nothing is admitted."""
    dep = market.client.deployment
    tok = AutoTokenizer.from_pretrained(str(smollm2_shards))
    shards = tiny_shards(tmp_path / "model", [(0, 2), (2, 4), (4, 6)], name=MODEL, vocab_size=len(tok))
    tok.save_pretrained(str(shards))
    registry = market.registry()
    registry.publish_model(market.deployer, MODEL, "QmTiny", bytes.fromhex(sha256_file(shards / MANIFEST_NAME)), 6)
    broker_proc = None
    log = tmp_path / "broker.log"
    layout = {"s1": "0:2", "m": "2:4", "c": "4:6"}
    with Swarm(tmp_path / "swarm", env={"DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}) as swarm:
        chain = ["--chain-id", "31337", "--market", dep.address_of("JobMarket"), "--registry"]
        chain += [dep.address_of("NodeRegistry")]
        workers = {name: swarm.launch(shards, layers, name, *chain) for name, layers in layout.items()}
        for w in workers.values():
            w.info = _wait_ready(w.proc, 240, w.log_path)
            register_worker(market, w, attested=True)
        swarm.wait_spans(MODEL, len(layout), registry=dep.address_of("NodeRegistry"))
        try:
            port = free_port()
            broker_proc = start_broker(market, shards, swarm.initial_peers, port, 1, log)
            quote = {"model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "policy": {"privacy": "high"}}
            res = httpx.post(f"http://127.0.0.1:{port}/v1/quotes", json=quote, timeout=60)
            assert res.status_code == 503 and res.json()["type"].endswith("no-route"), res.text
            assert "two workers of different operators" in res.json()["detail"], res.text
            client = market.new_funded_account(50 * UNIT)
            market.market().deposit(client, 10 * UNIT)
            with pytest.raises(AssertionError, match="two workers of different operators"):
                paid_job(market, port, client, MODEL, PROMPT, MAX_TOKENS, policy={"privacy": "high"})
            assert httpx.get(f"http://127.0.0.1:{port}/v1/jobs", timeout=10).json() == []  # nothing admitted
        finally:
            if broker_proc is not None:
                broker_proc.terminate()
                broker_proc.wait(timeout=30)
