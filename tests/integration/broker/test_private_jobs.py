"""A privacy=high job through the broker's API: its first stage runs on secret shares at two
workers of different operators, and JobMarket pays both; a share worker killed mid-job is replaced
under the job's policy and the survivor and the replacement are paid what they served (the victim
nothing); a broker killed mid-job is restarted and pays all four stages from their kept receipts.

Everything is real: Anvil with the contracts, four worker processes staked and registered on
chain (``s1``, ``s2`` and ``s3`` serve the first stage [0, 2), each under its own operator; ``m``
[2, 4) and ``c`` [4, 6)), `dlis broker start` over the P2P network, settlement on chain. The broker
plans the pair and the route after it (``planning.share_partner``), runs the first stage itself
(``node/private_entry.py``), and settles the job with both share receipts first, in ascending node
address, as JobMarket's rule for a shared range asks.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from dlis_market.chain.anvil import free_port
from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.types import model_id
from tests.integration.node.node_helpers import (
    Swarm,
    _wait_ready,
    kill_group,
    paid_job,
    published_tiny_model,
    register_worker,
    start_broker,
)

UNIT = 10**18
MODEL = "tiny-private-jobs"
LAYOUT = {"s1": "0:2", "s2": "0:2", "s3": "0:2", "m": "2:4", "c": "4:6"}
PROMPT = "The capital of France is"
MAX_TOKENS = 8


def private_body(market: Any, client: Any, jm: Any) -> tuple[dict[str, Any], str]:
    """A privacy=high job's request under a fresh authorization, and the job's id (the
    authorization's hash, as JobMarket derives it)."""
    mid = bytes.fromhex(model_id(MODEL, market.deployer.address)[2:])
    auth = JobAuthorization(
        client.address, market.broker.address, mid, UNIT, secrets.randbits(128), market.client.timestamp() + 1200
    )
    return {
        "model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "policy": {"privacy": "high"},
        "authorization": {
            "client": client.address, "nonce": str(auth.nonce), "max_cost": str(auth.max_cost),
            "deadline": auth.deadline, "signature": sign_authorization(client.key, jm.domain(), auth).hex(),
        },
    }, "0x" + auth.job_id.hex()  # fmt: skip


def settled(port: int, job_id: str, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 90
    while True:
        job: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] not in ("completed", "running"):
            assert job["status"] == "settled", (job["status"], job["error"], log.read_text()[-3000:])
            return job
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)


def stream_killing_a_share_worker(
    port: int, body: dict[str, Any], job_id: str, workers: dict[str, Any]
) -> tuple[str, str]:
    """POST the job as a token stream; after the first token, SIGKILL the share worker of the
    pair (as the job's route record names it) with the lower node address. (its name, the text)"""
    victim, text = None, ""
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/jobs", json={**body, "stream": True}, timeout=300) as res:
        assert res.status_code == 201, res.read()
        for line in res.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            assert event["type"] != "error", event
            text += event.get("text") or ""
            if event["type"] == "token" and victim is None:
                got = httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{job_id}", timeout=10).json()
                assert "route" in got, got
                route = got["route"]
                pair = sorted((h["node"] for h in route[:2]), key=lambda a: int(a, 16))
                victim = next(n for n, w in workers.items() if w.info["node_address"] == pair[0])
                workers[victim].kill()
    assert victim is not None
    return victim, text


def test_a_private_job_is_answered_as_a_plain_one_and_pays_both_share_workers(
    market: Any, smollm2_shards: Path, tmp_path: Path
) -> None:
    dep = market.client.deployment
    shards = published_tiny_model(market, smollm2_shards, tmp_path / "model", MODEL)
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
            pair = [r[0] for r in receipts[:2]]
            assert set(pair) <= {node["s1"], node["s2"], node["s3"]}
            assert pair == sorted(set(pair), key=lambda a: int(a, 16))
            assert [r[1:3] for r in receipts] == [(0, 2), (0, 2), (2, 4), (4, 6)] and receipts[2][0] == node["m"]
            paid = {n: jm.claimable_of(a) - claim0[n] for n, a in operators.items()}
            billed = {r[0]: r[3] for r in receipts}
            for name in LAYOUT:  # both share workers and the stages after them: exactly their receipts
                assert paid[name] == billed.get(node[name], 0), (name, paid, billed)
            assert all(paid[n] > 0 for n in ("m", "c")) and sum(paid[n] > 0 for n in ("s1", "s2", "s3")) == 2
            assert int(job["cost"]) == sum(billed.values())

            # a share worker killed mid-job: the broker's scheduler gives the survivor a partner
            # (another operator, no dearer), the answer is the same, the survivor, the replacement and the
            # stages after them are paid what they billed, the victim nothing
            claim1 = {n: jm.claimable_of(a) for n, a in operators.items()}
            body, job_id = private_body(market, client, jm)
            victim, text = stream_killing_a_share_worker(port, body, job_id, workers)
            assert text == plain["answer"]
            job = settled(port, job_id, log)
            shared = [r for r in job["receipts"] if r["end"] == 2]
            assert node[victim] not in {r["node"] for r in shared} and len(shared) == 2, job["receipts"]
            assert [r["node"] for r in shared] == sorted((r["node"] for r in shared), key=lambda a: int(a, 16))
            paid = {n: jm.claimable_of(a) - claim1[n] for n, a in operators.items()}
            billed = {r["node"]: int(r["amount"]) for r in job["receipts"]}
            assert paid[victim] == 0 and sum(paid.values()) == sum(billed.values()) == int(job["cost"])
            for name in LAYOUT:
                assert paid[name] == billed.get(node[name], 0), (name, paid, billed)

            # the broker SIGKILLed mid-job: the share workers sign and keep what they served, as the
            # stages do, and the restarted broker settles the job paying all four
            claim2 = {n: jm.claimable_of(a) for n, a in operators.items()}
            body, job_id = private_body(market, client, jm)
            with httpx.stream(
                "POST", f"http://127.0.0.1:{port}/v1/jobs", json={**body, "stream": True}, timeout=60
            ) as res:
                assert res.status_code == 201, res.read()
                for line in res.iter_lines():
                    if line.startswith("data:") and json.loads(line[5:])["type"] == "token":
                        kill_group(broker_proc)
                        break
            port = free_port()
            broker_proc = start_broker(market, shards, swarm.initial_peers, port, 1, log)
            job = settled(port, job_id, log)
            assert "interrupted" in (job["error"] or "") or job["completion_tokens"] == 0, job
            shared = [r for r in job["receipts"] if (r["start"], r["end"]) == (0, 2)]
            assert len(shared) == 2 and [r["end"] for r in job["receipts"]] == [2, 2, 4, 6], job["receipts"]
            paid = {n: jm.claimable_of(a) - claim2[n] for n, a in operators.items()}
            billed = {r["node"]: int(r["amount"]) for r in job["receipts"]}
            assert sum(paid.values()) == sum(billed.values()) == int(job["cost"]) and all(billed.values())
            for name in LAYOUT:
                assert paid[name] == billed.get(node[name], 0), (name, paid, billed)
        finally:
            if broker_proc is not None:
                broker_proc.terminate()
                broker_proc.wait(timeout=30)


def test_a_private_job_without_a_second_operator_is_refused_before_it_is_admitted(
    market: Any, smollm2_shards: Path, tmp_path: Path
) -> None:
    """One first-stage worker only: the broker refuses with a clear problem, nothing is admitted."""
    dep = market.client.deployment
    shards = published_tiny_model(market, smollm2_shards, tmp_path / "model", MODEL)
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
