"""The whole market on one machine, every part real and in its own process where it would be in
production: Anvil with the contracts, an embedded IPFS node holding the published SmolLM2 shards,
three workers that fetch their shards by CID and are staked and registered through the CLI, and
`dlis broker start`. A client pays for a job over HTTP; the broker is restarted between the job
and its settlement; the chain then shows exactly the receipts paid once (through the Merkle path:
each worker signs one batch receipt on the restarted broker's request), the protocol fee, and the
client's escrow down by exactly the cost; the answer equals local generation. A LoRA adapter
published and registered through the CLI is then named by a second job as ``smollm2-135m:NAME``:
the same workers fetch it by CID and apply it, and that job settles under the adapter's model id."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
from node_helpers import PASSWORD, Swarm, _wait_ready, cli, paid_job, start_broker, stop  # type: ignore[import-not-found]
from transformers import AutoTokenizer

from dlis_market.chain.anvil import free_port
from dlis_market.inference.adapter_training import train_tiny_adapter
from dlis_market.inference.importer import import_model
from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.storage.daemon import DaemonConfig, EmbeddedDaemon
from dlis_market.types import model_id
from tests.integration.conftest import CACHE, DEV_PUBLISHER

UNIT = 10**18
MODEL = "smollm2-135m"
PRICE = 10**12
PROMPT = "The capital of France is"


def test_paid_job_end_to_end_with_broker_restart(market, smollm2_shards: Path, tmp_path: Path) -> None:
    home = market.settings.home
    base_env = {"DLIS_HOME": str(home), "DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}
    dep = market.client.deployment
    jm, token = market.market(), market.token()
    ipfs = EmbeddedDaemon(DaemonConfig(repo=tmp_path / "ipfs", request_timeout_s=60))
    brokers: list[subprocess.Popen[bytes]] = []
    try:
        ipfs.start()
        out = cli(
            {**base_env, "DLIS_STORAGE__KUBO_API_URL": ipfs.info.api_url},
            "model",
            "publish",
            str(smollm2_shards),
            "--json",
        )
        cid = json.loads(out.strip().splitlines()[-1])["manifest_cid"]
        assert market.registry().get_model(bytes.fromhex(model_id(MODEL, DEV_PUBLISHER)[2:])).manifest_cid == cid

        operators = [market.accounts[i] for i in (4, 5, 6)]
        with Swarm(
            tmp_path / "swarm",
            env={
                "DLIS_STORAGE__KUBO_API_URL": ipfs.info.api_url,
                "DLIS_NODE__METRICS_PORT": "0",
                "DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url,  # session tickets: BROKER_ROLE on chain
            },
        ) as swarm:
            chain_args = ["--manifest-cid", cid, "--chain-id", "31337", "--market", dep.address_of("JobMarket"),
                          "--registry", dep.address_of("NodeRegistry"), "--price", str(PRICE)]  # fmt: skip
            workers = [swarm.launch(None, f"{a}:{b}", f"w{a}", *chain_args) for a, b in ((0, 10), (10, 20), (20, 30))]
            for w in workers:
                w.info = _wait_ready(w.proc, 300, w.log_path)
            for i, (w, (a, b)) in enumerate(zip(workers, ((0, 10), (10, 20), (20, 30)), strict=True)):
                # each worker fetched only the shard of its own range (plus config and tokenizer)
                held = {p.name for p in (w.home / "models" / cid).glob("*.safetensors")}
                assert held == {f"stage-{i:02d}-layers-{a}-{b}.safetensors"}, held
            for w, op, idx in zip(workers, operators, (4, 5, 6), strict=True):
                # each operator stakes and registers its worker's node key through the CLI
                (w.home / "deployments").mkdir(exist_ok=True)
                shutil.copy(home / "deployments" / "31337.json", w.home / "deployments" / "31337.json")
                wenv = {"DLIS_HOME": str(w.home), "DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}
                cli(wenv, "chain", "faucet", op.address, "500")
                cli(wenv, "node", "stake", "200", "--account", f"dev:{idx}")
                pw = w.home / "password"
                register = ["node", "register", "--account", f"dev:{idx}", "--node-key", "node"]
                register += ["--node-password-file", str(pw), "--peer-id", w.info["peer_id"]]
                cli(wenv, *register, "--attestation-hash", w.info["attestation_hash"])
                assert market.registry().get(w.info["node_address"]).routable
            assert PASSWORD  # workers unlock their node keys with the helper's password file

            client = market.new_funded_account(50 * UNIT)
            jm.deposit(client, 10 * UNIT)
            escrow0, treasury0 = jm.escrow_of(client.address), jm.claimable_of(dep.treasury)
            port = free_port()
            brokers.append(
                start_broker(market, smollm2_shards, swarm.initial_peers, port, 3600, tmp_path / "broker.log")
            )
            job = paid_job(market, port, client, MODEL, PROMPT, 8)
            assert [(h["start"], h["end"]) for h in job["route"]] == [(0, 10), (10, 20), (20, 30)]
            assert {r["node"] for r in job["receipts"]} == {w.info["node_address"] for w in workers}

            # the answer is exactly what the model gives in one process
            local = LocalPipeline.load(smollm2_shards)
            tok = AutoTokenizer.from_pretrained(str(smollm2_shards))
            ref = local.generate_ids([tok(PROMPT)["input_ids"]], max_new_tokens=8)[0]
            assert job["answer"] == tok.decode(ref.token_ids, skip_special_tokens=True)

            # every worker exports Prometheus metrics of the work it just did
            for w in workers:
                text = httpx.get(w.info["metrics_url"], timeout=10).text
                assert 'dlis_worker_stage_step_seconds_count{phase="prefill"} 1.0' in text
                assert 'dlis_worker_stage_step_seconds_count{phase="decode"}' in text
                assert "dlis_worker_dht_peers" in text and "dlis_worker_kv_cache_capacity_bytes" in text

            # a LoRA adapter, published and registered through the CLI, is a model jobs can name
            adapter = tmp_path / "pirate"
            adapter_id = train_tiny_adapter(
                import_model(MODEL, CACHE / "models", CACHE / "cache"), adapter, r=4, seed=1
            )
            pub_env = {**base_env, "DLIS_STORAGE__KUBO_API_URL": ipfs.info.api_url}
            out = cli(pub_env, "model", "adapter", "publish", str(adapter), "--base", str(smollm2_shards), "--json")
            published = json.loads(out[out.index("{") :])  # the command prints one JSON object
            assert published["model"] == f"{MODEL}:pirate" and published["registered_on_chain"]
            adapter_mid = bytes.fromhex(model_id(f"{MODEL}:pirate", DEV_PUBLISHER)[2:])
            assert market.registry().get_model(adapter_mid).manifest_cid == published["cid"]
            client2 = market.new_funded_account(50 * UNIT)
            jm.deposit(client2, 10 * UNIT)
            escrow2 = jm.escrow_of(client2.address)
            tuned = paid_job(market, port, client2, f"{MODEL}:pirate", PROMPT, 8)
            aid = local.attach_adapter(adapter, expected_sha256=adapter_id)
            with_adapter = local.generate_ids([tok(PROMPT)["input_ids"]], max_new_tokens=8, adapters=[aid])[0]
            assert tuned["answer"] == tok.decode(with_adapter.token_ids, skip_special_tokens=True)
            assert tuned["answer"] != job["answer"]  # the adapter changes what the model says
            listed = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()["data"]
            assert [m["id"] for m in listed] == [MODEL, f"{MODEL}:pirate"]
            for w in workers:  # each fetched it by CID on its first session with it
                assert "attached adapter smollm2-135m:pirate" in w.log_path.read_text()

            # broker stops before settling; nothing moved on chain yet
            stop(brokers.pop())
            assert jm.escrow_of(client.address) == escrow0
            brokers.append(start_broker(market, smollm2_shards, swarm.initial_peers, port, 1, tmp_path / "broker.log"))
            deadline = time.monotonic() + 120
            while True:
                job = httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{job['id']}", timeout=30).json()
                if job["status"] == "settled":
                    break
                assert time.monotonic() < deadline, job
                time.sleep(1)
            while (tuned := httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{tuned['id']}", timeout=30).json())[
                "status"
            ] != "settled":
                assert time.monotonic() < deadline, tuned
                time.sleep(1)
            time.sleep(3)  # a few more settlement passes: nothing may be paid twice
            # the adapter job settled under the adapter's model id, for exactly its receipts
            assert jm.escrow_of(client2.address) == escrow2 - int(tuned["cost"]) - int(tuned["fee"])
            assert int(tuned["cost"]) == sum(int(r["amount"]) for r in tuned["receipts"]) > 0

            cost, fee = int(job["cost"]), int(job["fee"])
            assert cost == sum(int(r["amount"]) for r in job["receipts"]) > 0
            assert fee == cost * jm.fee_bps() // 10_000
            assert jm.escrow_of(client.address) == escrow0 - cost - fee
            assert jm.claimable_of(dep.treasury) == treasury0 + fee + int(tuned["fee"])
            for op, r, t in zip(operators, job["receipts"], tuned["receipts"], strict=True):
                assert jm.claimable_of(op.address) == int(r["amount"]) + int(t["amount"])
            assert job["settlement"]["tx_hash"].startswith("0x")
            # settled through the Merkle path: the restarted broker asked each worker over libp2p to
            # sign one batch receipt over the receipts it signed (no per-stage signature checked)
            tx = market.client.w3.eth.get_transaction(job["settlement"]["tx_hash"])
            fn, _ = jm.contract.decode_function_input(tx["input"])
            assert fn.fn_name == "settleBatchMerkle"
            before = token.balance_of(operators[0].address)
            jm.claim(operators[0])
            owed = int(job["receipts"][0]["amount"]) + int(tuned["receipts"][0]["amount"])
            assert token.balance_of(operators[0].address) == before + owed
    finally:
        for b in brokers:
            stop(b)
        ipfs.stop()
