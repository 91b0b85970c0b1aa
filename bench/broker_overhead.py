"""Broker overhead, measured against driving the same pipeline directly, in one run.

Sets up a real local market (Anvil + contracts), three `dlis node start` workers serving
SmolLM2 bf16 in three ranges (staked and registered through the CLI) and `dlis broker start`.
Then, on the same workers:
  * time to first token: a streamed paid job through the broker's HTTP API (request sent ->
    first token event) vs the pipeline driver opening a session and yielding its first token;
  * job submissions per second: paid one-token jobs submitted back to back through the API vs
    one-token jobs run directly with the driver.
Prints ratios and writes JSON (default bench/results/broker_overhead.json).

    .venv/bin/python bench/broker_overhead.py [--jobs 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from dlis_market.chain.anvil import free_port
from dlis_market.chain.devnet import LocalMarket, local_market
from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.inference.importer import import_model
from dlis_market.inference.manifest import MANIFEST_NAME, sha256_file
from dlis_market.inference.shard_export import export_shards
from dlis_market.node.driver import JobSpec, PipelineDriver
from dlis_market.settings import NodeSettings
from dlis_market.types import model_id

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
UNIT = 10**18
CACHE = Path(tempfile.gettempdir()) / "dlis-test-cache" / "v1"


def dlis(env: dict[str, str], *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "dlis_market.cli.main", *args], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"dlis {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def wait_ready(proc: subprocess.Popen[bytes], out: Path, log: Path, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith("DLIS_NODE_READY "):
                return dict(json.loads(line[len("DLIS_NODE_READY ") :]))
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise SystemExit(f"worker did not become ready:\n{log.read_text()[-2000:]}")


def start_workers(m: LocalMarket, shards: Path, root: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    dep = m.client.deployment
    procs, peers = [], []
    for i, (a, b) in enumerate(((0, 10), (10, 20), (20, 30))):
        home = root / f"w{i}"
        (home / "deployments").mkdir(parents=True)
        shutil.copy(m.settings.deployments_dir / "31337.json", home / "deployments")
        (home / "pw").write_text("bench-password")
        env = {**os.environ, "DLIS_HOME": str(home), "DLIS_CHAIN__RPC_URL": m.settings.chain.rpc_url}
        env |= {"DLIS_CHAIN__KEYSTORE_SCRYPT_N": "1024", "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        cmd = [sys.executable, "-m", "dlis_market.cli.worker", "start", "--shards", str(shards), "--layers", f"{a}:{b}",
               "--password-file", str(home / "pw"), "--threads", "1", "--chain-id", "31337",
               "--market", dep.address_of("JobMarket"), "--registry", dep.address_of("NodeRegistry")]  # fmt: skip
        for p in peers[:1]:
            cmd += ["--initial-peer", p]
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=(home / "log").open("wb"), start_new_session=True
        )
        procs.append(proc)
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode()
            if line.startswith("DLIS_NODE_READY "):
                info = json.loads(line[len("DLIS_NODE_READY ") :])
                break
        else:
            raise SystemExit(f"worker {i} died:\n{(home / 'log').read_text()[-2000:]}")
        maddr = info["maddrs"][0]
        peers.append(maddr if "/p2p/" in maddr else f"{maddr}/p2p/{info['peer_id']}")
        op = m.accounts[4 + i]
        dlis(env, "chain", "faucet", op.address, "1500")
        dlis(env, "node", "stake", "1000", "--account", f"dev:{4 + i}")
        dlis(env, "node", "register", "--account", f"dev:{4 + i}", "--node-key", "node",
             "--node-password-file", str(home / "pw"), "--peer-id", info["peer_id"])  # fmt: skip
    return procs, peers


def authorization(m: LocalMarket, client: Any, max_cost: int) -> dict[str, Any]:
    jm = m.market()
    mid = bytes.fromhex(model_id(MODEL, m.deployer.address)[2:])
    auth = JobAuthorization(client.address, m.broker.address, mid, max_cost,
                            secrets.randbits(128), m.client.timestamp() + 3600)  # fmt: skip
    sig = sign_authorization(client.key, jm.domain(), auth)
    return {"client": client.address, "nonce": str(auth.nonce), "max_cost": str(max_cost), "deadline": auth.deadline,
            "signature": sig.hex()}  # fmt: skip


async def direct(peers: list[str], m: LocalMarket, prompt_ids: list[int], jobs: int) -> dict[str, float]:
    dep = m.client.deployment
    settings = NodeSettings(chain_id=31337, market_address=dep.address_of("JobMarket"),
                            registry_address=dep.address_of("NodeRegistry"))  # fmt: skip
    driver = await PipelineDriver.create(peers, settings, bytes(m.broker.key))  # tickets: the broker's key
    try:
        for _ in range(240):  # announcements reach the DHT asynchronously
            if len(await driver.discover(MODEL)) >= 3:
                break
            await asyncio.sleep(0.5)
        ttfts = []
        for _ in range(5):
            t0 = time.perf_counter()
            session = await driver.open_job(JobSpec(MODEL, prompt_ids, 4, num_layers=30))
            async for _tok in session.tokens():
                ttfts.append(time.perf_counter() - t0)
                break
            await session.close()
        t0 = time.perf_counter()
        for _ in range(jobs):
            await driver.generate(JobSpec(MODEL, prompt_ids, 1, num_layers=30))
        rate = jobs / (time.perf_counter() - t0)
        return {"ttft_ms": statistics.median(ttfts) * 1000, "jobs_per_s": rate}
    finally:
        await driver.close()


def through_broker(url: str, m: LocalMarket, client: Any, jobs: int) -> dict[str, float]:
    ttfts = []
    with httpx.Client(base_url=url, timeout=300) as http:
        for _ in range(5):
            body = {
                "model": MODEL,
                "prompt": PROMPT,
                "max_tokens": 4,
                "stream": True,
                "authorization": authorization(m, client, UNIT),
            }
            t0 = time.perf_counter()
            first: float | None = None
            with http.stream("POST", "/v1/jobs", json=body) as res:
                for line in res.iter_lines():
                    if first is None and line.startswith("event: token"):
                        first = time.perf_counter() - t0
            assert first is not None, "the broker streamed no token"
            ttfts.append(first)
        t0 = time.perf_counter()
        for _ in range(jobs):
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "authorization": authorization(m, client, UNIT)}
            assert http.post("/v1/jobs", json=body).status_code == 201
        rate = jobs / (time.perf_counter() - t0)
    return {"ttft_ms": statistics.median(ttfts) * 1000, "jobs_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "broker_overhead.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_market(Path(tmp) / "home") as m:
        shards = Path(tmp) / "shards"
        export_shards(
            import_model(MODEL, CACHE / "models", CACHE / "cache"), shards, stages=3, dtype="bf16", name=MODEL
        )
        # workers serve only a model published on chain with this very manifest
        m.registry().publish_model(
            m.deployer, MODEL, "QmShards", bytes.fromhex(sha256_file(shards / MANIFEST_NAME)), 30
        )
        procs, peers = start_workers(m, shards, Path(tmp) / "workers")
        broker = None
        try:
            from transformers import AutoTokenizer

            prompt_ids = AutoTokenizer.from_pretrained(str(shards))(PROMPT)["input_ids"]
            port = free_port()
            env = {**os.environ, **m.settings.to_env(), "DLIS_BROKER__PORT": str(port), "OMP_WAIT_POLICY": "PASSIVE"}
            cmd = [
                sys.executable,
                "-m",
                "dlis_market.cli.main",
                "broker",
                "start",
                "--model-dir",
                str(shards),
                "--initial-peer",
                peers[0],
            ]
            broker = subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            url = f"http://127.0.0.1:{port}"
            for _ in range(240):
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            client = m.new_funded_account(1000 * UNIT)
            m.market().deposit(client, 500 * UNIT)
            base = asyncio.run(direct(peers, m, prompt_ids, args.jobs))
            ours = through_broker(url, m, client, args.jobs)
        finally:
            for p in [*procs, broker]:
                if p is not None and p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
                    try:
                        p.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
    report = {
        "jobs": args.jobs,
        "direct_driver": base,
        "broker": ours,
        "ratios": {
            "ttft_broker_vs_direct": ours["ttft_ms"] / base["ttft_ms"],
            "jobs_per_s_broker_vs_direct": ours["jobs_per_s"] / base["jobs_per_s"],
        },
    }
    print(f"{'':28s} {'direct driver':>14s} {'via broker':>12s} {'ratio':>8s}")
    r = report["ratios"]
    ttft = r["ttft_broker_vs_direct"]
    print(f"{'time to first token (ms)':28s} {base['ttft_ms']:14.1f} {ours['ttft_ms']:12.1f} {ttft:8.2f}")
    rate = r["jobs_per_s_broker_vs_direct"]
    print(f"{'one-token jobs per second':28s} {base['jobs_per_s']:14.2f} {ours['jobs_per_s']:12.2f} {rate:8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
