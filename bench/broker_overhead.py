"""Broker overhead, measured against driving the same pipeline directly, in one run.

Sets up a real local market (Anvil + contracts), three `dlis node start` workers serving
SmolLM2 bf16 in three ranges (staked and registered through the CLI) and `dlis broker start`.
Then, on the same workers:
  * time to first token: a streamed paid job through the broker's HTTP API (request sent ->
    first token event) vs the pipeline driver opening a session and yielding its first token;
  * job submissions per second: paid one-token jobs submitted back to back through the API vs
    one-token jobs run directly with the driver (which looks the route up on the DHT for each
    job, as a `dlis` client driving the pipeline does).
The two sides alternate in rounds, so drift of a shared machine moves both alike. Prints ratios
and writes JSON with every job's time (default bench/results/broker_overhead.json).

    .venv/bin/python bench/broker_overhead.py [--jobs 40] [--rounds 4] [--out FILE]
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
    procs: list[subprocess.Popen[bytes]] = []
    peers: list[str] = []
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


def _side(ttfts: list[float], each_ms: list[float], name: str) -> dict[str, Any]:
    """One side's figures: median time to first token, jobs/s over the time its jobs took, and
    every job's time (``{name}_ms``)."""
    return {
        "ttft_ms": statistics.median(ttfts) * 1000,
        "jobs_per_s": len(each_ms) / (sum(each_ms) / 1000),
        f"{name}_ms_p50": statistics.median(each_ms),
        f"{name}_ms_mean": statistics.fmean(each_ms),
        f"{name}_ms": [round(x, 2) for x in each_ms],
    }


async def compare(
    peers: list[str], m: LocalMarket, prompt_ids: list[int], url: str, client: Any, jobs: int, rounds: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same measurements on both sides, interleaved (direct, broker, direct, ...) so that a
    machine that speeds up or slows down during the run moves both alike."""
    dep = m.client.deployment
    settings = NodeSettings(chain_id=31337, market_address=dep.address_of("JobMarket"),
                            registry_address=dep.address_of("NodeRegistry"))  # fmt: skip
    driver = await PipelineDriver.create(peers, settings, bytes(m.broker.key))  # tickets: the broker's key
    http = httpx.AsyncClient(base_url=url, timeout=300)
    try:
        for _ in range(240):  # announcements reach the DHT asynchronously
            if len(await driver.discover(MODEL)) >= 3:
                break
            await asyncio.sleep(0.5)
        ttft_direct, ttft_broker = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            session = await driver.open_job(JobSpec(MODEL, prompt_ids, 4, num_layers=30))
            async for _tok in session.tokens():
                ttft_direct.append(time.perf_counter() - t0)
                break
            await session.close()
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True,
                    "authorization": authorization(m, client, UNIT)}  # fmt: skip
            t0 = time.perf_counter()
            first: float | None = None
            async with http.stream("POST", "/v1/jobs", json=body) as res:
                async for line in res.aiter_lines():
                    if first is None and line.startswith("event: token"):
                        first = time.perf_counter() - t0
            assert first is not None, "the broker streamed no token"
            ttft_broker.append(first)
        bodies = [
            {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "authorization": authorization(m, client, UNIT)}
            for _ in range(jobs)
        ]
        direct_ms: list[float] = []
        requests_ms: list[float] = []
        rows: list[dict[str, Any]] = []
        per_round = max(1, jobs // rounds)
        while len(direct_ms) < jobs:
            for _ in range(min(per_round, jobs - len(direct_ms))):
                t1 = time.perf_counter()
                await driver.generate(JobSpec(MODEL, prompt_ids, 1, num_layers=30))
                direct_ms.append((time.perf_counter() - t1) * 1000)
            for body in bodies[len(rows) : len(direct_ms)]:
                t1 = time.perf_counter()
                res = await http.post("/v1/jobs", json=body)
                requests_ms.append((time.perf_counter() - t1) * 1000)
                assert res.status_code == 201, res.text
                rows.append(res.json())
    finally:
        await http.aclose()
        await driver.close()
    # Where a job's time goes: the client's whole request vs the broker's run of it (backend
    # start to the recorded row); the rest is HTTP, authorization, admission and planning.
    run_ms = [float(r["latency_ms"]) for r in rows]
    base = _side(ttft_direct, direct_ms, "job")
    ours = _side(ttft_broker, requests_ms, "request") | {
        "run_ms": [round(x, 2) for x in run_ms],
        "run_ms_p50": statistics.median(run_ms),
        "outside_run_ms_p50": statistics.median(a - b for a, b in zip(requests_ms, run_ms, strict=True)),
    }
    return base, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40, help="one-token jobs on each side")
    parser.add_argument("--rounds", type=int, default=4, help="direct and broker jobs alternate in this many rounds")
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
            base, ours = asyncio.run(compare(peers, m, prompt_ids, url, client, args.jobs, args.rounds))
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
        "rounds": args.rounds,
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
    print(
        f"a one-token job (p50): direct {base['job_ms_p50']:.1f} ms; via the broker {ours['request_ms_p50']:.1f} ms, "
        f"of which the broker's run {ours['run_ms_p50']:.1f} ms and HTTP + admission + planning "
        f"{ours['outside_run_ms_p50']:.1f} ms"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
