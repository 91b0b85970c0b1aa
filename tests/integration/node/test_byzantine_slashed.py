"""A cheating worker is caught by a spot check and slashed on chain; honest nodes never are.

Every part is real and in its own process: Anvil with the contracts, five worker processes (a
tiny Llama with SmolLM2's tokenizer so that the broker can serve it), staked and registered
through the CLI, `dlis oracle start` requiring a referee (2 of 3) and trusting the broker as its
spot-check runner, and `dlis broker start` checking every stage call. Worker ``m`` runs with
``--byzantine``: it corrupts its activations and overstates its throughput, so the scheduler
routes the first job through it. The broker re-runs m's call on ``m2``, referees with ``m3``,
the oracle slashes m's operator below the minimum stake, and the next job avoids m.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
from node_helpers import (  # type: ignore[import-not-found]
    Swarm,
    _wait_ready,
    cli,
    paid_job,
    start_broker,
    start_oracle,
    stop,
    tiny_shards,
)
from transformers import AutoTokenizer

from dlis_market.chain.anvil import free_port
from dlis_market.inference.manifest import MANIFEST_NAME, sha256_file
from dlis_market.oracle.store import DB_FILE, OracleStore

UNIT = 10**18
MODEL = "tiny-smol"
PRICE = 10**12
LAYOUT = {"a": "0:2", "m": "2:4", "m2": "2:4", "m3": "2:4", "c": "4:6"}
OPERATORS = {"a": 4, "m": 5, "m2": 6, "m3": 7, "c": 8}  # Anvil dev accounts


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_byzantine_worker_is_slashed_end_to_end(market, smollm2_shards: Path, tmp_path: Path) -> None:
    home = market.settings.home
    dep = market.client.deployment
    staking, registry = market.staking(), market.registry()
    min_stake, slash = staking.min_stake(), market.settings.oracle.slash_amount
    tok = AutoTokenizer.from_pretrained(str(smollm2_shards))
    shards = tiny_shards(tmp_path / "model", [(0, 2), (2, 4), (4, 6)], name=MODEL, vocab_size=len(tok))
    tok.save_pretrained(str(shards))  # the broker tokenizes prompts with the model's tokenizer
    published = bytes.fromhex(sha256_file(shards / MANIFEST_NAME))  # the broker checks the served manifest
    registry.publish_model(market.deployer, MODEL, "QmTinySmol", published, 6)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # workers check each session ticket's signer for BROKER_ROLE on this chain
        with Swarm(tmp_path / "swarm", env={"DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}) as swarm:
            chain_args = ["--chain-id", "31337", "--market", dep.address_of("JobMarket"),
                          "--registry", dep.address_of("NodeRegistry"), "--price", str(PRICE)]  # fmt: skip
            workers = {
                name: swarm.launch(shards, layers, name, *chain_args, *(["--byzantine"] if name == "m" else []))
                for name, layers in LAYOUT.items()
            }
            for name, w in workers.items():
                w.info = _wait_ready(w.proc, 240, w.log_path)
                idx = OPERATORS[name]
                (w.home / "deployments").mkdir(exist_ok=True)
                shutil.copy(home / "deployments" / "31337.json", w.home / "deployments" / "31337.json")
                wenv = {"DLIS_HOME": str(w.home), "DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}
                cli(wenv, "chain", "faucet", market.accounts[idx].address, str(min_stake // UNIT))
                cli(wenv, "node", "stake", str(min_stake // UNIT), "--account", f"dev:{idx}")
                register = ["node", "register", "--account", f"dev:{idx}", "--node-key", "node"]
                register += ["--node-password-file", str(w.home / "password"), "--peer-id", w.info["peer_id"]]
                cli(wenv, *register, "--attestation-hash", w.info["attestation_hash"])
            assert "TEST ONLY" in workers["m"].log_path.read_text()
            swarm.wait_spans(MODEL, len(LAYOUT), registry=dep.address_of("NodeRegistry"))
            operator = {n: market.accounts[i].address for n, i in OPERATORS.items()}
            stake0 = {n: staking.info(a).active for n, a in operator.items()}

            oracle_port, broker_port = free_port(), free_port()
            oracle_env = {  # trusts the broker as its spot-check runner; slashes only with a referee
                "DLIS_ORACLE__SPOT_CHECK_RUNNERS": f'["{market.broker.address}"]',
                "DLIS_ORACLE__SPOT_CHECK_REQUIRE_REFEREE": "true",
            }
            procs.append(start_oracle(market, oracle_port, tmp_path / "oracle.log", **oracle_env))
            broker_env = {
                "DLIS_BROKER__ORACLE_URL": f"http://127.0.0.1:{oracle_port}",
                "DLIS_BROKER__SPOT_CHECK_FRACTION": "1.0",
                "DLIS_BROKER__STANDING_CACHE_S": "1",
            }
            log = tmp_path / "broker.log"
            procs.append(start_broker(market, shards, swarm.initial_peers, broker_port, 3600, log, **broker_env))
            client = market.new_funded_account(50 * UNIT)
            market.market().deposit(client, 10 * UNIT)

            # 1. the cheater's overstated throughput (10x its measured speed) wins it the route; its call
            # is re-run and it is slashed. The honest replicas' own figures are noisy on 2 loaded cores
            # (start-up profiles and the oracle's failure risk both enter the route's objective), so a
            # job or two may go to an honest replica first: their checks pass and nobody is slashed.
            m_node = workers["m"].info["node_address"]
            routes = []
            for _ in range(4):
                job = paid_job(market, broker_port, client, MODEL, "The capital of France is", 4)
                routes.append(job["route"])
                if {h["start"]: h["node"] for h in job["route"]}[2] == m_node:
                    break
                assert staking.info(operator["m"]).active == stake0["m"]  # an honest route slashes nobody
            assert {h["start"]: h["node"] for h in routes[-1]}[2] == m_node, routes
            deadline = time.monotonic() + 90
            while staking.info(operator["m"]).active == stake0["m"]:
                assert time.monotonic() < deadline, (tmp_path / "broker.log").read_text()[-4000:]
                time.sleep(0.5)
            assert staking.info(operator["m"]).active == stake0["m"] - slash < min_stake
            assert not registry.get(m_node).routable
            evidence = list(OracleStore(f"sqlite:///{tmp_path / 'oracle' / DB_FILE}").slashes().values())
            assert len(evidence) == 1 and m_node.lower() in evidence[0].lower()

            # 2. the next job avoids the slashed node (once the broker's 1 s standing cache expires)
            time.sleep(1.5)
            job = paid_job(market, broker_port, client, MODEL, "Paris is a city in", 4)
            assert {h["start"]: h["node"] for h in job["route"]}[2] in {
                workers["m2"].info["node_address"],
                workers["m3"].info["node_address"],
            }
            broker_metrics = f"http://127.0.0.1:{broker_port}/metrics"
            deadline = time.monotonic() + 60
            while metric(broker_metrics, 'dlis_broker_spot_checks_total{outcome="pass"}') < 1:
                assert time.monotonic() < deadline, (tmp_path / "broker.log").read_text()[-4000:]
                time.sleep(0.5)

            # the broker signed what it saw each stage do and the oracle stored it for reputation
            store = OracleStore(f"sqlite:///{tmp_path / 'oracle' / DB_FILE}")
            deadline = time.monotonic() + 30
            while job["id"].lower() not in {o.job_id.lower() for _, o in store.observations_after(-1)}:
                assert time.monotonic() < deadline, (tmp_path / "broker.log").read_text()[-4000:]
                time.sleep(0.5)
            seen = {o.node.lower() for _, o in store.observations_after(-1) if o.job_id.lower() == job["id"].lower()}
            assert seen == {h["node"].lower() for h in job["route"]}

            # honest nodes kept every token of their stake; exactly one slash happened
            for name in ("a", "m2", "m3", "c"):
                assert staking.info(operator[name]).active == stake0[name], name
            assert metric(f"http://127.0.0.1:{oracle_port}/metrics", "dlis_oracle_slashes_total") == 1
            assert metric(broker_metrics, 'dlis_broker_spot_checks_total{outcome="slashed"}') == 1
    finally:
        for p in procs:
            stop(p)
