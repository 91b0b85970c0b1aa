"""A stage killed mid-job under a tight max cost: the failover route settles on chain.

Fault injected: the worker serving the middle range of a paid job gets SIGKILL after the first
streamed token. Three replicas serve that range: ``m1`` (on the first route), ``m2`` (it announces
the highest throughput but asks 5 % more per token) and ``m3`` (slower, same price as ``m1``). The
client authorized exactly what the first route may cost, fee included.

The driver used to fail over with its own router (Dijkstra on throughput): it picked ``m2`` and
checked its price without the protocol fee, so the job finished and then reverted at settlement
(receipts + fee over the authorization), and no stage that served it was paid. Now failover
replans through the broker's scheduler with the job's policy and the authorization's max cost,
priced by ``protocol.pricing`` as JobMarket charges: it takes ``m3``, the job settles, and every
stage of the final route is paid exactly its receipt (the killed stage signs nothing).

Everything is real: Anvil with the contracts, five worker processes staked and registered on
chain, `dlis broker start` over the P2P network.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from dlis_market.chain.anvil import free_port
from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.protocol.pricing import route_bound
from dlis_market.types import model_id
from tests.integration.node.node_helpers import (
    Swarm,
    _wait_ready,
    published_tiny_model,
    register_worker,
    start_broker,
)

UNIT = 10**18
MODEL = "tiny-failover"
PRICE = 10**12
LAYOUT = {"a": (0, 2), "m1": (2, 4), "m2": (2, 4), "m3": (2, 4), "c": (4, 6)}
PRICES = {"a": PRICE, "m1": PRICE, "m2": PRICE * 105 // 100, "m3": PRICE, "c": PRICE}
LATENCY_S = {"a": 2e-4, "m1": 2e-4, "m2": 5e-5, "m3": 1e-3, "c": 2e-4}  # per layer: m2 fastest, m3 slowest
MAX_TOKENS = 48
PROMPT = "The capital of France is"


def announce_profile(home: Path, layers: tuple[int, int], latency_s: float) -> None:
    """The hardware profile the worker announces (what a node declares about itself), written
    where the worker caches its measured profile, so the routers see fixed throughputs."""
    profile = {
        "gemm_flops": 1e10, "memory_bandwidth": 1e10, "free_memory": 2**32, "layer_latency_s": latency_s,
        "threads": 1, "device": "cpu", "measured_at": time.time(),
    }  # fmt: skip
    path = home / "node" / f"profile-{MODEL}-{layers[0]}-{layers[1]}-fp32-t1.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile))


def stream_and_kill(port: int, body: dict, victim) -> str:
    """POST the job as a token stream; SIGKILL ``victim`` after the first token; the job id."""
    job_id = None
    killed = False
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/jobs", json=body, timeout=300) as res:
        assert res.status_code == 201, res.read()
        for line in res.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            job_id = event.get("job_id", job_id)
            if event["type"] == "token" and not killed:
                victim.kill()
                killed = True
            assert event["type"] != "error", event
    assert killed and job_id is not None
    return job_id


def test_failover_under_a_tight_max_cost_settles_and_pays_every_stage(market, smollm2_shards: Path, tmp_path: Path):
    dep = market.client.deployment
    tok = AutoTokenizer.from_pretrained(str(smollm2_shards))
    shards = published_tiny_model(market, smollm2_shards, tmp_path / "model", MODEL)
    jm = market.market()
    fee_bps = jm.fee_bps()
    broker_proc = None
    with Swarm(tmp_path / "swarm", env={"DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}) as swarm:
        chain = ["--chain-id", "31337", "--market", dep.address_of("JobMarket"), "--registry"]
        chain += [dep.address_of("NodeRegistry")]
        workers = {}
        for name, layers in LAYOUT.items():
            announce_profile(swarm.root / name, layers, LATENCY_S[name])
            workers[name] = swarm.launch(shards, f"{layers[0]}:{layers[1]}", name, *chain, "--price", str(PRICES[name]))

        operators = {}
        for name, w in workers.items():
            w.info = _wait_ready(w.proc, 240, w.log_path)
            operators[name] = register_worker(market, w)
        swarm.wait_spans(MODEL, len(LAYOUT), registry=dep.address_of("NodeRegistry"))
        try:
            port = free_port()
            broker_proc = start_broker(
                market, shards, swarm.initial_peers, port, 1, tmp_path / "broker.log",
                DLIS_BROKER__SPOT_CHECK_FRACTION="0", DLIS_BROKER__STANDING_CACHE_S="1",
            )  # fmt: skip
            client = market.new_funded_account(50 * UNIT)
            jm.deposit(client, 10 * UNIT)
            tokens = len(tok(PROMPT)["input_ids"]) + MAX_TOKENS
            tight = route_bound([PRICE, PRICE, PRICE], tokens, fee_bps).total  # what a, m1/m3, c may cost
            assert route_bound([PRICE, PRICES["m2"], PRICE], tokens, fee_bps).total > tight  # m2 does not fit
            auth = JobAuthorization(
                client.address, market.broker.address, bytes.fromhex(model_id(MODEL, market.deployer.address)[2:]),
                tight, secrets.randbits(64), market.client.timestamp() + 1200,
            )  # fmt: skip
            body = {
                "model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True,
                "policy": {"max_cost": str(tight)},
                "authorization": {
                    "client": client.address, "nonce": str(auth.nonce), "max_cost": str(tight),
                    "deadline": auth.deadline, "signature": sign_authorization(client.key, jm.domain(), auth).hex(),
                },
            }  # fmt: skip
            escrow0 = jm.escrow_of(client.address)
            claim0 = {n: jm.claimable_of(a) for n, a in operators.items()}
            job_id = stream_and_kill(port, body, workers["m1"])

            deadline = time.monotonic() + 60
            while True:
                job = httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{job_id}", timeout=10).json()
                if job["settlement"]["tx_hash"] or job["status"] not in ("completed", "running"):
                    break
                assert time.monotonic() < deadline, (tmp_path / "broker.log").read_text()[-4000:]
                time.sleep(0.5)
            assert job["status"] == "settled", (
                job["status"],
                job["error"],
                (tmp_path / "broker.log").read_text()[-3000:],
            )
            node = {n: w.info["node_address"] for n, w in workers.items()}
            assert [h["node"] for h in job["route"]] == [node["a"], node["m3"], node["c"]], job["route"]
            paid = {n: jm.claimable_of(a) - claim0[n] for n, a in operators.items()}
            billed = {r["node"]: int(r["amount"]) for r in job["receipts"]}
            for name in ("a", "m3", "c"):  # every stage of the final route: exactly its receipt
                assert paid[name] == billed[node[name]] > 0, (name, paid, billed)
            assert paid["m1"] == paid["m2"] == 0
            charged = escrow0 - jm.escrow_of(client.address)
            assert charged == int(job["cost"]) + int(job["fee"]) <= tight
        finally:
            if broker_proc is not None:
                broker_proc.terminate()
                broker_proc.wait(timeout=30)
