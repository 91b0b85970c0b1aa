"""Calibrate `dlis sim` on `make demo`'s network: the same 4 workers run for real, then simulated.

Real run (bounded, about 10 minutes with the demo already built in --home):
  * starts a second copy of `scripts/demo.sh` on its own ports and DLIS_HOME (workers with a
    Prometheus port each), or uses one that runs (--reuse); stops it at the end unless --keep;
  * reads what the workers measured about themselves: the profiler's per-layer time at their
    thread count (the DLIS_NODE_READY line's throughput and the cached profile), and during the
    run their own forward-pass timer (`dlis_worker_stage_step_seconds{phase}`, prefill and decode);
  * measures the loopback link to each worker: `info` round trips from a libp2p driver / 2;
  * sends paid jobs through the broker's HTTP API, streamed, one prompt of 32 tokens and 32 new
    tokens (the demo scenario's client), in closed loops of 1, 2 and 4 users (24, 24 and 48 jobs,
    after two warm-up jobs per user at each concurrency: the first merged passes of each batch size
    are slow; the three take turns in 6 rounds, so that each sees the same mix of the shared
    machine's load), and records the broker's latency_ms / ttft_ms and the client's times (every
    token's); after each loop it waits until no worker runs a pass (the spot checks' re-runs of its
    last jobs), so that every loop starts on an idle network as a simulated round does; it reads
    the processes' CPU seconds (/proc) around each loop, and samples the runnable threads of every
    session (RunQueue): with autogroup the kernel shares the cores between sessions first, so what
    the demo gets is its session's share, which other programs' work moves from round to round
    (the main cause of the real figures' spread: a sequential job took 2.6 s in one round, 5.7 s
    in another);
  * splits the rounds into two repeats (even and odd rounds) and reports each figure's spread
    between them: what the real side itself reproduces, so what a sim can be held to;
  * measures the stage's batch curve: a forward pass over 1..8 sessions (decode, and prefill of
    the 32-token prompt) relative to one, on the real Stage in this process, 1 thread.

Calibration, from the sequential phase only (concurrency 1): compute per layer = each worker's
mean decode pass / its layers; prefill ratio = prefill pass / (prompt tokens x decode pass) on the
spans no spot check re-runs; links = the measured round trips / 2; the broker's fixed costs
(admit, open, close) and the per-pass messaging cost are what the broker's and client's clocks
show beyond those; the job-to-job spread (job_speed_cv) is the latencies' coefficient of variation.
The broker routes on the figures the workers announced (their profilers'), without load, so the
calibrated scenario offers those (advertised_ms_per_layer, offers_track_load: false). The
calibrated scenario uses the batched stage model (sim/passes.py): the measured batch curves; one
host whose cores are the demo session's share of the machine (RunQueue, mean of the sequential
rounds), no background threads; threads per worker from its profile; the measured compute and
broker costs converted to full speed by the share each had, round by round (worker_share,
broker_share; with the spot checks' re-runs beside them, host_share); job_speed_cv = the jobs'
spread within a round (the rounds' shares are simulated themselves); speed_period_s = the median
sequential job latency; pass_cv = the token gaps' spread within a job x sqrt(stages);
message_jitter_ms = the `info` round trips / 2 while the sequential jobs ran (LinkProbe), beyond
the idle median. Without autogroup: the machine's cores and a background = the CPU other programs
used. Written to dlis_market/sim/scenarios/demo_calibrated.yaml.

Simulation: that scenario with the same closed loops (one run per real round with that round's
share of the cores, 5 times over, pooled); p50/p90/p99 of job latency and time to first token
(the broker's clocks: from the job running), sim / real ratios, and whether each is within 15 %,
per figure and quantile, for 1, 2 and 4 users; the workers' decode sessions per pass, real (their
counters) and simulated. The
same is printed for the old chunked stage model on the same figures ("chunked"), the workers'
profiler figures alone and the shipped demo.yaml (assumed device figures).

    .venv/bin/python bench/sim_calibration.py [--reuse] [--keep] [--home DIR] [--phases 1:24,2:24,4:48] [--rounds 6]
    .venv/bin/python bench/sim_calibration.py --from-json bench/results/sim_calibration.json  # the model only
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine_info

from dlis_market.settings import Settings
from dlis_market.sim.engine import simulate
from dlis_market.sim.scenario import Market, Scenario, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
# 32 tokens in SmolLM2's tokenizer; greedy decoding runs on past 32 new tokens without an EOS
PROMPT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who went out every "
    "morning before sunrise to cast his nets into the cold"
)
MAX_TOKENS = 32
PORTS = {  # the second demo copy's ports (scripts/demo.sh)
    "DEMO_PORT": "8745",
    "DEMO_BROKER_PORT": "8380",
    "DEMO_ORACLE_PORT": "8390",
    "DEMO_IPFS_API_PORT": "6101",
    "DEMO_IPFS_SWARM_PORT": "5101",
    "DEMO_IPFS_GATEWAY_PORT": "8901",
}
SPECS = [("phone", 1), ("laptop", 1), ("server", 2), ("laptop", 1)]  # demo.sh's workers: class, threads
TARGET = 0.15
SESSIONS = Settings.load(environ={}).inference.max_sessions  # the demo's workers keep the default
SEEDS = 5
CALIBRATED = ROOT / "dlis_market" / "sim" / "scenarios" / "demo_calibrated.yaml"
STEP = re.compile(r'^dlis_worker_stage_step_seconds_(sum|count)\{phase="(\w+)"\} (\S+)$', re.M)


# ---------------------------------------------------------------------- the demo network


def demo(home: Path, *args: str, timeout_s: float = 600) -> None:
    env = {**os.environ, **PORTS, "DLIS_HOME": str(home), "DLIS_NODE__METRICS_PORT": "0"}
    log = home / "demo-calibration.log"
    home.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        res = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), *args], env=env, stdout=out,
                             stderr=subprocess.STDOUT, timeout=timeout_s, cwd=ROOT)  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"scripts/demo.sh {' '.join(args)} failed ({res.returncode}):\n{log.read_text()[-3000:]}")


def workers(home: Path) -> list[dict[str, Any]]:
    """Each worker's READY line and cached profile (what it measured about itself at start)."""
    out = []
    for i, (cls, threads) in enumerate(SPECS, 1):
        lines = [
            ln
            for ln in (home / "logs" / f"worker{i}.log").read_text().splitlines()
            if ln.startswith("DLIS_NODE_READY ")
        ]
        if not lines:
            raise SystemExit(f"worker {i} printed no DLIS_NODE_READY line; see {home}/logs/worker{i}.log")
        ready = json.loads(lines[-1][len("DLIS_NODE_READY ") :])
        layers = ready["end"] - ready["start"]
        name = f"profile-{MODEL}-{ready['start']}-{ready['end']}-bf16-t{threads}.json"
        prof = json.loads((home / "workers" / f"w{i}" / "node" / name).read_text())
        if not ready.get("metrics_url"):
            raise SystemExit(
                f"worker {i} serves no metrics: start the demo with DLIS_NODE__METRICS_PORT=0 (no --reuse)"
            )
        out.append({
            "worker": i, "device": cls, "threads": prof["threads"], "start": ready["start"], "end": ready["end"],
            "peer_id": ready["peer_id"], "node": ready["node_address"], "metrics_url": ready["metrics_url"],
            "maddr": ready["maddrs"][0], "ready_throughput": ready["throughput"],
            "profiler_ms_per_layer": 1000.0 / (ready["throughput"] * layers),
            "profile_measured_at": prof["measured_at"],
        })  # fmt: skip
    return out


def step_counters(ws: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Each worker's forward-pass timer: {prefill_sum, prefill_count, decode_sum, decode_count}."""
    out = []
    for w in ws:
        text = httpx.get(w["metrics_url"], timeout=10).text
        out.append({f"{phase}_{kind}": float(v) for kind, phase, v in STEP.findall(text)})
    return out


def settle(ws: list[dict[str, Any]], quiet_s: float = 0.6, timeout_s: float = 60.0) -> float:
    """Wait until no worker has run a forward pass for ``quiet_s`` (the spot checks' re-runs of the
    last jobs are done): the next phase starts on an idle network, as each simulated round does."""
    t0 = time.perf_counter()
    seen, since = step_counters(ws), time.perf_counter()
    while time.perf_counter() - since < quiet_s and time.perf_counter() - t0 < timeout_s:
        time.sleep(0.2)
        now = step_counters(ws)
        if now != seen:
            seen, since = now, time.perf_counter()
    return time.perf_counter() - t0


def cpu_seconds(home: Path) -> dict[str, float]:
    """CPU seconds each of the demo's processes (with its children: p2pd daemons) has used, and the
    whole machine ("machine"), from /proc: what competes with the passes."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, used = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parent[int(d.name)], used[int(d.name)] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
    roots = {int(f.read_text()): f.stem for f in (home / "run").glob("*.pid")}
    out = dict.fromkeys(roots.values(), 0.0)
    for pid, cpu in used.items():
        p = pid
        while p > 1 and p not in roots:
            p = parent.get(p, 0)
        if p in roots:
            out[roots[p]] += cpu
    # the whole machine's busy time (exited processes included): what other programs used
    busy = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    out["machine"] = (sum(busy) - busy[3] - busy[4]) / tick  # all but idle and iowait
    return out


def group_share(cores: float, others: list[int]) -> float:
    """The cores one more scheduling group that wants them all gets beside groups running
    ``others`` runnable threads each (CFS with autogroup: a fair share per group, each group at most
    its own demand; the leftover of modest groups goes to the rest)."""
    left, n = cores, len(others) + 1
    for d in sorted(min(float(x), cores) for x in others):
        if d >= left / n:
            break
        left, n = left - d, n - 1
    return left / n


class RunQueue(threading.Thread):
    """Samples the machine's runnable threads by scheduling group while a loop runs. The kernel
    here schedules with autogroup (/proc/sys/kernel/sched_autogroup_enabled): CPU time is shared
    fairly between sessions first, then between a session's threads. The demo's processes are one
    session, so what they get is a group's share (``group_share``) of the cores, whatever their own
    thread count: the sim's host for them is that many cores with no background threads."""

    def __init__(self, home: Path, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.every_s, self.stop = every_s, threading.Event()
        self.ours = {_autogroup(int(f.read_text())) for f in (home / "run").glob("*.pid")} | {_autogroup(os.getpid())}
        self.enabled = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
        self.samples: list[tuple[float, int, int]] = []  # (our group's share, others' threads, ours)

    def run(self) -> None:
        cores = float(os.cpu_count() or 1)
        me = os.getpid()
        while not self.stop.wait(self.every_s):
            groups: dict[str, int] = {}
            for d in Path("/proc").iterdir():
                if not d.name.isdigit() or int(d.name) == me:
                    continue
                try:
                    running = sum(1 for t in (d / "task").iterdir()
                                  if (t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R")  # fmt: skip
                    if running:
                        g = _autogroup(int(d.name)) if self.enabled else d.name
                        groups[g] = groups.get(g, 0) + running
                except OSError:  # gone meanwhile
                    continue
            others = [v for g, v in groups.items() if g not in self.ours]
            ours = sum(v for g, v in groups.items() if g in self.ours)
            share = group_share(cores, others) if self.enabled else cores / (1 + sum(others))
            self.samples.append((share, sum(others), ours))

    def result(self) -> dict[str, float]:
        self.stop.set()
        self.join()
        xs = self.samples or [(float(os.cpu_count() or 1), 0, 0)]
        return {"group_cores": statistics.mean(x[0] for x in xs), "other_threads": statistics.mean(x[1] for x in xs),
                "demo_threads": statistics.mean(x[2] for x in xs), "samples": len(self.samples)}  # fmt: skip


def _autogroup(pid: int) -> str:
    """The process's autogroup; a kernel thread (none) is scheduled on its own."""
    try:
        return Path(f"/proc/{pid}/autogroup").read_text().split()[0]
    except (OSError, IndexError):
        return f"pid-{pid}"


def hop_latency(home: Path, ws: list[dict[str, Any]], repeats: int = 30,
                samples: list[list[float]] | None = None) -> list[float]:  # fmt: skip
    """One-way loopback latency to each worker: median `info` round trip over libp2p / 2; the
    round trips themselves (ms) go to ``samples``."""
    samples = [] if samples is None else samples
    import asyncio

    from dlis_market.chain.accounts import dev_accounts
    from dlis_market.node.driver import PipelineDriver
    from dlis_market.settings import NodeSettings

    dep = json.loads((home / "deployments" / "31337.json").read_text())["contracts"]
    boot = ws[0]["maddr"] if "/p2p/" in ws[0]["maddr"] else f"{ws[0]['maddr']}/p2p/{ws[0]['peer_id']}"

    async def run() -> list[float]:
        st = NodeSettings(chain_id=31337, market_address=dep["JobMarket"]["address"],
                          registry_address=dep["NodeRegistry"]["address"])  # fmt: skip
        key = bytes(dev_accounts(Settings.load().chain.dev_mnemonic)[9].key)
        driver = await PipelineDriver.create([boot], st, key)
        try:
            out = []
            for w in ws:
                await driver.pool.request(w["peer_id"], "info", {}, 10)
                rtts = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    await driver.pool.request(w["peer_id"], "info", {}, 10)
                    rtts.append(time.perf_counter() - t)
                out.append(statistics.median(rtts) * 1000 / 2)
                samples.append([round(x * 1000, 4) for x in rtts])
            return out
        finally:
            await driver.close()

    return asyncio.run(run())


class LinkProbe(threading.Thread):
    """`info` round trips to each worker, one every ``every_s``, while the sequential loop runs:
    what a message takes while the workers compute (a worker's event loop waits for the GIL its
    forward pass holds, the demo's session is short of cores), beyond the idle median. The sim
    draws one such delay per message (message_jitter_ms): sessions the driver sends on their own
    reach the first stage apart by them."""

    def __init__(self, home: Path, ws: list[dict[str, Any]], every_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.home, self.ws, self.every_s = home, ws, every_s
        self.stop, self.ready = threading.Event(), threading.Event()
        self.rtts: list[list[float]] = [[] for _ in ws]
        self.error: BaseException | None = None

    def run(self) -> None:
        import asyncio

        from dlis_market.chain.accounts import dev_accounts
        from dlis_market.node.driver import PipelineDriver
        from dlis_market.settings import NodeSettings

        dep = json.loads((self.home / "deployments" / "31337.json").read_text())["contracts"]
        w0 = self.ws[0]
        boot = w0["maddr"] if "/p2p/" in w0["maddr"] else f"{w0['maddr']}/p2p/{w0['peer_id']}"

        async def probe() -> None:
            st = NodeSettings(chain_id=31337, market_address=dep["JobMarket"]["address"],
                              registry_address=dep["NodeRegistry"]["address"])  # fmt: skip
            key = bytes(dev_accounts(Settings.load().chain.dev_mnemonic)[8].key)
            driver = await PipelineDriver.create([boot], st, key)
            try:
                for w in self.ws:
                    await driver.pool.request(w["peer_id"], "info", {}, 10)
                self.ready.set()
                while not self.stop.is_set():
                    for k, w in enumerate(self.ws):
                        t = time.perf_counter()
                        await driver.pool.request(w["peer_id"], "info", {}, 10)
                        self.rtts[k].append(round((time.perf_counter() - t) * 1000, 4))
                        await asyncio.sleep(self.every_s)
            finally:
                await driver.close()

        try:
            asyncio.run(probe())
        except BaseException as exc:  # reported by result()
            self.error = exc
            self.ready.set()

    def result(self) -> list[list[float]]:
        self.stop.set()
        self.join(30)
        if self.error is not None:
            raise SystemExit(f"the link probe failed: {self.error!r}")
        return self.rtts


# ---------------------------------------------------------------------- paid jobs


class Client:
    """dev:9 (funded and with escrow after demo.sh) sending paid jobs to the broker's HTTP API."""

    def __init__(self, url: str, rpc: str) -> None:
        from dlis_market.chain.accounts import dev_accounts
        from dlis_market.chain.client import connect_web3

        self.url, self.account = url, dev_accounts(Settings.load().chain.dev_mnemonic)[9]
        self.body = {"model": MODEL, "max_tokens": MAX_TOKENS, "prompt": PROMPT, "stream": True}
        self.quote = httpx.post(f"{url}/v1/quotes", json={k: v for k, v in self.body.items() if k != "stream"},
                                timeout=60).json()  # fmt: skip
        self.now = int(connect_web3(rpc).eth.get_block("latest")["timestamp"])

    def authorization(self) -> dict[str, Any]:
        from dlis_market.broker.auth import signing_deadline
        from dlis_market.chain.job_market import JobAuthorization, market_domain, sign_authorization

        q = self.quote
        auth = JobAuthorization(
            client=self.account.address, broker=q["broker"], model_id=bytes.fromhex(q["model_id"][2:]),
            max_cost=int(q["max_total"]), nonce=secrets.randbits(255),
            deadline=signing_deadline(self.now, int(q["max_authorization_lifetime_s"])),
        )  # fmt: skip
        sig = sign_authorization(self.account.key, market_domain(q["chain_id"], q["job_market"]), auth)
        return {"client": self.account.address, "nonce": str(auth.nonce), "max_cost": str(auth.max_cost),
                "deadline": auth.deadline, "signature": sig.hex()}  # fmt: skip

    def job(self, http: httpx.Client) -> dict[str, Any]:
        """One streamed job; the client's clock: request sent, first and last token, done."""
        body = {**self.body, "authorization": self.authorization()}
        t0 = time.perf_counter()
        first = last = done = None
        times: list[float] = []
        job_id = None
        event = ""
        with http.stream("POST", "/v1/jobs", json=body) as res:
            if res.status_code != 201:
                raise SystemExit(f"the broker refused a job: {res.status_code} {res.read().decode()[:500]}")
            for line in res.iter_lines():
                now = time.perf_counter()
                if line.startswith("event: "):
                    event = line[7:].strip()
                elif line.startswith("data: ") and event == "token":
                    first = first if first is not None else now
                    last = now
                    times.append(now)
                elif line.startswith("data: ") and event in ("done", "error"):
                    done = now
                    job_id = json.loads(line[6:]).get("job_id")
                    if event == "error":
                        raise SystemExit(f"job failed: {line}")
        if first is None or last is None or done is None or job_id is None:
            raise SystemExit("the broker's stream ended without tokens or a done event")
        gaps = [1000 * (b - a) for a, b in itertools.pairwise(times)]
        return {"id": job_id, "sent": t0, "first_ms": (first - t0) * 1000, "last_ms": (last - t0) * 1000,
                "done_ms": (done - t0) * 1000, "gaps_ms": gaps}  # fmt: skip


def closed_loop(client: Client, users: int, jobs: int) -> tuple[list[dict[str, Any]], float]:
    """``users`` threads, each sending the next job when its previous one is done, ``jobs`` in all."""
    lock, taken, results = threading.Lock(), [0], []
    errors: list[BaseException] = []

    def user() -> None:
        with httpx.Client(base_url=client.url, timeout=300) as http:
            while True:
                with lock:
                    if taken[0] >= jobs or errors:
                        return
                    taken[0] += 1
                try:
                    r = client.job(http)
                except BaseException as exc:
                    errors.append(exc)
                    return
                with lock:
                    results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=user) for _ in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, time.perf_counter() - t0


def broker_records(url: str, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for j in jobs:
            rec = http.get(f"/v1/jobs/{j['id']}").json()
            out.append({**j, "ttft_ms": rec["ttft_ms"], "latency_ms": rec["latency_ms"],
                        "prompt_tokens": rec["prompt_tokens"], "new_tokens": rec["completion_tokens"],
                        "route": [h["peer_id"] for h in rec["route"]]})  # fmt: skip
    return out


# ---------------------------------------------------------------------- calibration


def batch_costs(shard_dir: Path, sizes: tuple[int, ...] = (1, 2, 3, 4, 8), repeats: int = 8) -> dict[str, Any]:
    """A forward pass over b sessions relative to one, on the real Stage the workers run (middle
    span [10, 20), 1 thread, prompt 32, decode at positions 33..35): the worker merges queued steps
    into such passes (node/sessions.py). Sizes interleaved, medians: robust to the shared load."""
    import torch

    from dlis_market.inference.messages import StageInput
    from dlis_market.inference.stage import Stage
    from dlis_market.types import LayerRange

    torch.set_num_threads(1)
    stage = Stage.load(shard_dir, LayerRange(start=10, end=20))
    hidden, prompt = int(stage.config.hidden_size), 32  # the bench's prompt
    sids = [f"calibration-{i}" for i in range(max(sizes))]
    dec: dict[int, list[float]] = {b: [] for b in sizes}
    pre: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(repeats):
        for b in sizes:
            for sid in sids[:b]:
                stage.open_session(sid, prompt + 8)
            t = time.perf_counter()
            prompts = torch.zeros(b, prompt, hidden, dtype=stage.dtype)
            stage.forward(StageInput(tuple(sids[:b]), (0,) * b, 0, hidden=prompts))
            pre[b].append(time.perf_counter() - t)
            for i in range(4):
                t = time.perf_counter()
                stage.forward(StageInput(tuple(sids[:b]), (prompt + i,) * b, 0,
                                         hidden=torch.zeros(b, 1, hidden, dtype=stage.dtype)))  # fmt: skip
                if i:  # the first decode step after a prefill warms caches
                    dec[b].append(time.perf_counter() - t)
            for sid in sids[:b]:
                stage.close_session(sid)
    d1, p1 = statistics.median(dec[1]), statistics.median(pre[1])
    return {"decode": {b: round(statistics.median(dec[b]) / d1, 4) for b in sizes},
            "prefill": {b: round(statistics.median(pre[b]) / p1, 4) for b in sizes},
            "decode_ms_b1": d1 * 1000, "prefill_ms_b1": p1 * 1000}  # fmt: skip


def calibrate(ws: list[dict[str, Any]], links: list[float], steps: list[dict[str, float]],
              jobs: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The sim's figures from the sequential phase: ``steps`` are the workers' counter deltas."""
    by_peer = {w["peer_id"]: k for k, w in enumerate(ws)}
    prompt = statistics.median(j["prompt_tokens"] for j in jobs)
    spans: dict[tuple[int, int], list[int]] = {}
    for k, w in enumerate(ws):
        spans.setdefault((w["start"], w["end"]), []).append(k)
    decode, prefill, ratios, sources = [], [], [], []
    for k, w in enumerate(ws):
        s = steps[k]
        n, m = s.get("decode_count", 0.0), s.get("prefill_count", 0.0)
        dec = s["decode_sum"] / n if n else None
        pre = s["prefill_sum"] / m if m else None
        decode.append(dec)
        prefill.append(pre)
        # a replica's prefill passes include the spot checks' re-runs of whole sessions: spans
        # served by one worker only give a clean ratio
        if dec and pre and len(spans[(w["start"], w["end"])]) == 1:
            ratios.append(pre / (prompt * dec))
    ratio = statistics.mean(ratios)
    ms_per_layer = []
    for k, w in enumerate(ws):
        layers = w["end"] - w["start"]
        own = decode[k]
        if own is not None:
            ms_per_layer.append(1000.0 * own / layers)
            sources.append("own decode passes, sequential phase")
            continue
        # never routed while calibrating: a replica that served, else its profiler figure
        mates = [d for j in spans[(w["start"], w["end"])] if (d := decode[j]) is not None]
        ms_per_layer.append(1000.0 * statistics.mean(mates) / layers if mates else w["profiler_ms_per_layer"])
        sources.append("same span's serving replica (this one was not routed)" if mates else "profiler")
    # per pass: the stages' compute on the route, their links and the answer's way back
    decode_route, prefill_route = [], []
    for j in jobs:
        ks = [by_peer[p] for p in j["route"]]
        link = sum(links[k] for k in ks) + links[ks[-1]]
        decode_route.append(sum(ms_per_layer[k] * (ws[k]["end"] - ws[k]["start"]) for k in ks) + link)
        prefill_route.append(sum(ms_per_layer[k] * (ws[k]["end"] - ws[k]["start"]) * ratio * j["prompt_tokens"]
                                 for k in ks) + link)  # fmt: skip
    per_token = [(j["last_ms"] - j["first_ms"]) / max(j["new_tokens"] - 1, 1) for j in jobs]
    pass_ms = max(0.0, statistics.median(t - d for t, d in zip(per_token, decode_route, strict=True)))
    open_ms = max(0.0, statistics.median(j["ttft_ms"] - p - pass_ms for j, p in zip(jobs, prefill_route, strict=True)))
    close_ms = max(
        0.0, statistics.median(j["latency_ms"] - j["ttft_ms"] - (j["last_ms"] - j["first_ms"]) for j in jobs)
    )
    admit_ms = max(0.0, statistics.median(j["first_ms"] - j["ttft_ms"] for j in jobs))
    latencies = [j["latency_ms"] for j in jobs]
    return {
        "ms_per_layer": ms_per_layer, "ms_per_layer_source": sources, "link_ms": links,
        "decode_pass_ms": [d * 1000 if d else None for d in decode],
        "prefill_pass_ms": [p * 1000 if p else None for p in prefill],
        "prefill_ratio": ratio, "prompt_tokens": prompt,
        "measured_ms_per_token_p50": statistics.median(per_token),
        "predicted_stage_and_link_ms_per_token_p50": statistics.median(decode_route),
        "overheads": {"admit_ms": admit_ms, "open_ms": open_ms, "close_ms": close_ms, "pass_ms": pass_ms},
        "job_speed_cv": statistics.stdev(latencies) / statistics.mean(latencies),
    }  # fmt: skip


def batched_figures(ws: list[dict[str, Any]], seq: dict[str, Any], curve: dict[str, Any]) -> dict[str, Any]:
    """The batched model's figures from the sequential phase ``seq`` (its jobs, the workers' step
    counters, the processes' CPU seconds)."""
    wall, cpu = seq["wall_s"], seq["cpu_s"]
    demo = sum(v for k, v in cpu.items() if k != "machine")
    # what ran beside a route's passes: other programs (the machine's busy time less the demo's, as
    # cores busy) and the spot checks' re-runs on the workers off the route (their busy share; the
    # sim runs those re-runs itself, so they only enter the full-speed figures, see scenario_data)
    on_route = {p for j in seq["jobs"] for p in j["route"]}
    checks = sum(w["threads"] * (st.get("prefill_sum", 0.0) + st.get("decode_sum", 0.0))
                 for w, st in zip(ws, seq["steps"], strict=True) if w["peer_id"] not in on_route) / wall  # fmt: skip
    # one stage pass's jitter: the spread of a job's token gaps around its own mean, split over the
    # route's passes (independent, of similar size)
    rel = [g / statistics.mean(j["gaps_ms"]) for j in seq["jobs"] for g in j["gaps_ms"]]
    hops = statistics.median(len(j["route"]) for j in seq["jobs"])
    # with autogroup the demo's processes get their session's share of the cores, whatever the
    # other sessions' thread counts (RunQueue): the host is that share, with no background threads
    rounds = [r for r in seq.get("rounds", []) if "group_cores" in r]
    if rounds:
        # measured time x the share the pass had in its round = its work at full speed; so per worker
        # the share averaged over its pass time, per round (the share moves a lot between rounds)
        worker_share = []
        for k, w in enumerate(ws):
            busy = [(r["steps"][k].get("decode_sum", 0.0) + r["steps"][k].get("prefill_sum", 0.0), r) for r in rounds]
            total = sum(b for b, _ in busy)
            worker_share.append(sum(b * host_share(round_share(r), checks, w["threads"]) for b, r in busy) / total
                                if total else 1.0)  # fmt: skip
        walls = sum(r["wall_s"] for r in rounds)
        broker_share = sum(r["wall_s"] * host_share(round_share(r), checks, 1) for r in rounds) / walls
        # the jobs' spread within a round: the spread between rounds is the shares' (simulated per round)
        within = []
        for r in rounds:
            lat = [j["latency_ms"] for j in seq["jobs"][r["first"] : r["first"] + r["jobs"]]]
            within += [x / statistics.mean(lat) for x in lat]
        return {**curve, "background": 0.0, "host_cores": statistics.mean(round_share(r) for r in rounds),
                "worker_share": worker_share, "broker_share": broker_share, "job_speed_cv": statistics.stdev(within),
                "checks_threads": checks,
                "other_cores": max(0.0, cpu["machine"] - demo) / wall, "demo_cores": demo / wall,
                "step_cv": statistics.stdev(rel), "pass_cv": statistics.stdev(rel) * hops**0.5,
                "speed_period_s": statistics.median(j["latency_ms"] for j in seq["jobs"]) / 1000}  # fmt: skip
    return {**curve, "background": max(0.0, cpu["machine"] - demo) / wall, "checks_threads": checks,
            "host_cores": float(os.cpu_count() or 1),
            "demo_cores": demo / wall, "step_cv": statistics.stdev(rel), "pass_cv": statistics.stdev(rel) * hops**0.5,
            "speed_period_s": statistics.median(j["latency_ms"] for j in seq["jobs"]) / 1000}  # fmt: skip


def round_share(r: dict[str, Any]) -> float:
    """The cores the demo's session had in round ``r``: its fair share beside the other sessions'
    runnable threads (RunQueue), and at least the CPU its processes used (/proc)."""
    used = sum(v for k, v in r["cpu_s"].items() if k != "machine") / r["wall_s"]
    return max(r["group_cores"], used)


def host_share(cores: float, background: float, threads: int) -> float:
    """The share of its full speed a pass of ``threads`` threads got alone on ``cores`` under
    ``background`` runnable threads (the sim's HostCpu rule): measured times x this = full speed."""
    return min(1.0, cores / (background + threads))


def scenario_data(
    ws: list[dict[str, Any]],
    ms_per_layer: list[float],
    links: list[float],
    cal: dict[str, Any] | None,
    batched: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """demo.yaml's four workers with per-worker compute and links; ``cal``: also the prefill ratio
    and the broker's overheads (None: the sim's defaults, no overheads)."""
    base = yaml.safe_load((ROOT / "dlis_market" / "sim" / "scenarios" / "demo.yaml").read_text())
    peers = []
    for k, (w, g) in enumerate(zip(ws, base["peers"], strict=True)):
        # loopback: 1,152 bytes a token take under a microsecond; the hop's latency is the cost
        # the broker routes on what the worker announced: its profiler's figure at start
        # KV slots: the worker's own limit (settings.inference.max_sessions), not the class's guess
        prof = {"compute_ms_per_layer": round(ms_per_layer[k], 4),
                "advertised_ms_per_layer": round(w["profiler_ms_per_layer"], 4),
                "link_latency_ms": round(links[k], 4), "bandwidth_bytes_per_s": 1e9, "hazard_per_slot": 0.0,
                "max_sessions": SESSIONS}  # fmt: skip
        if batched is not None:  # full-speed compute on a host shared by the four workers
            share = batched["worker_share"][k] if "worker_share" in batched else host_share(
                batched["host_cores"], batched["background"] + batched["checks_threads"], w["threads"])  # fmt: skip
            prof["compute_ms_per_layer"] = round(ms_per_layer[k] * share, 4)
            prof["threads"] = w["threads"]
            g = {**g, "host": "demo"}
        peers.append({**g, "profile": prof})
    data: dict[str, Any] = {"name": "demo-calibrated", "model": base["model"], "peers": peers,
                            "clients": [{"name": "bench", "concurrency": 1, "jobs": 16, "prompt_tokens": 32,
                                         "max_new_tokens": MAX_TOKENS}],
                            "hours": 1, "market": {"check_fraction": 1.0, "settle_interval_s": 2.0},
                            "offers_track_load": False}  # fmt: skip
    if cal is not None:
        data["prefill_ratio"] = round(cal["prefill_ratio"], 5)
        data["job_speed_cv"] = round(cal["job_speed_cv"], 4)
        data["overheads"] = {k: round(v, 3) for k, v in cal["overheads"].items()}
    if batched is not None:
        data["stage_model"] = "batched"
        data["hosts"] = {"demo": {"cores": round(batched["host_cores"], 4),
                                  "background_threads": batched["background"]}}  # fmt: skip
        data["broker_host"] = "demo"
        if cal is not None:  # the broker's work and messaging, measured under that load too
            share = batched.get("broker_share") or host_share(
                batched["host_cores"], batched["background"] + batched["checks_threads"], 1)  # fmt: skip
            for cost in ("open_ms", "close_ms", "pass_ms"):
                data["overheads"][cost] = round(data["overheads"][cost] * share, 3)
        data["batch_decode_cost"] = batched["decode"]
        data["batch_prefill_cost"] = batched["prefill"]
        data["speed_period_s"] = round(batched["speed_period_s"], 3)
        data["pass_cv"] = round(batched["pass_cv"], 4)
        if "job_speed_cv" in batched:  # within a round (the rounds' own shares are simulated)
            data["job_speed_cv"] = round(batched["job_speed_cv"], 4)
        # each message's delay beyond its link's idle median: the `info` round trips / 2 while the
        # sequential jobs ran (LinkProbe; idle ones if none), per worker
        jitter = [max(0.0, x / 2 - statistics.median(w["info_rtt_ms"]) / 2)
                  for w in ws for x in w.get("busy_info_rtt_ms", w.get("info_rtt_ms", []))]  # fmt: skip
        if jitter:
            data["message_jitter_ms"] = sorted(round(x, 4) for x in jitter)
    return data


def write_calibrated(data: dict[str, Any], ws: list[dict[str, Any]], load: str) -> None:
    head = (
        "# `make demo`'s four workers as bench/sim_calibration.py measured them (written by it; rerun it to\n"
        f"# refresh). Load average at the time: {load}. Per worker: compute per layer from its own decode\n"
        "# passes (dlis_worker_stage_step_seconds), link = libp2p `info` round trip / 2 on loopback, no churn\n"
        "# (none in a bench run). prefill_ratio: the workers' prefill / decode passes. overheads: what the\n"
        "# broker's and the client's clocks show beyond the stages and links (see Overheads in scenario.py).\n"
        "# stage_model batched (sim/passes.py): batch_*_cost measured on the real Stage in-process\n"
        "# (batch_costs); host = the cores the demo's session gets as one scheduling group (autogroup;\n"
        "# RunQueue: its fair share beside the other sessions' runnable threads, sampled during the\n"
        "# sequential phase; the comparison runs each round with that round's share), no background\n"
        "# threads (without autogroup: this machine's cores, background = the CPU other programs used\n"
        "# during the sequential phase); compute and the broker's open/close/pass costs = the measured\n"
        "# times x the share of the cores they had then (host_share: that background and the spot checks'\n"
        "# re-runs beside them); speed_period_s = the median sequential job latency (job_speed_cv's span);\n"
        "# pass_cv = the spread of a job's token gaps x sqrt(stages); message_jitter_ms = the `info` round\n"
        "# trips / 2 beyond their median, per worker.\n"
        "# The profilers' own figures at start (ms/layer): "
        + ", ".join(f"w{w['worker']} {w['profiler_ms_per_layer']:.2f}" for w in ws)
        + "\n"
    )
    CALIBRATED.write_text(head + yaml.safe_dump(data, sort_keys=False, width=120))


# ---------------------------------------------------------------------- comparison


def pcts(xs: list[float]) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(xs, q)) for q in (50, 90, 99)}


def simulated(sc: Scenario, users: int, jobs: int, prompt: int, new: int, shares: list[float | None]) -> dict[str, Any]:
    """One run per real round, SEEDS times over, pooled; a round's measured group share of the cores
    (``shares``, None: not measured) is the demo host's cores in its runs."""
    data = sc.model_dump(mode="json")
    data["clients"] = [{"name": "bench", "concurrency": users, "jobs": jobs, "prompt_tokens": prompt,
                        "max_new_tokens": new}]  # fmt: skip
    runs = []
    for share in shares:
        d = json.loads(json.dumps(data))
        if share is not None and "demo" in d.get("hosts", {}):
            d["hosts"]["demo"]["cores"] = share
        runs.append(parse_scenario(d, "calibration phase"))
    s = runs[0]
    market = Market.of(s.market, Settings.load(environ={}))
    ok, sent = [], 0
    steps = [[0, 0, 0.0] for _ in range(sum(g.count for g in s.peers))]  # per peer: decode steps, passes, time
    for seed in range(len(runs) * SEEDS):
        r = simulate(runs[seed % len(runs)], market, seed=seed)
        ok += [j for j in r.jobs if j.status == "ok"]  # the shipped devices churn: a job may fail
        sent += len(r.jobs)
        for k, log in enumerate(r.extra.get("passes", [])):
            steps[k][0] += log["decode_steps"]
            steps[k][1] += log["decode_passes"]
            steps[k][2] += log.get("decode_busy_s", 0.0)
    close = s.overheads.close_ms
    return {
        "latency_ms": pcts([1000 * (j.finished - j.started) for j in ok]),
        "ttft_ms": pcts([1000 * (j.first_token - j.started) for j in ok]),
        "client_latency_ms": pcts([1000 * (j.finished - j.arrived) for j in ok]),
        "decode_ms_per_token": pcts([(1000 * (j.finished - j.first_token) - close) / max(new - 1, 1) for j in ok]),
        "routes": _count(" -> ".join(f"w{i + 1}" for i in j.route) for j in ok),
        "completed": f"{len(ok)} of {sent}",
        "batch": [round(a / b, 3) if b else None for a, b, _ in steps],  # decode session-steps per pass
        "decode_pass_ms": [1000 * t / b if b else None for _, b, t in steps],  # a decode pass's mean duration
    }


def _count(keys: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in keys:
        out[k] = out.get(k, 0) + 1
    return out


def real_figures(jobs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {
        "latency_ms": pcts([j["latency_ms"] for j in jobs]),
        "ttft_ms": pcts([j["ttft_ms"] for j in jobs]),
        "client_latency_ms": pcts([j["done_ms"] for j in jobs]),
        "decode_ms_per_token": pcts([(j["last_ms"] - j["first_ms"]) / max(j["new_tokens"] - 1, 1) for j in jobs]),
    }


def sessions_per_pass(ws: list[dict[str, Any]], steps: list[dict[str, float]], jobs: list[dict[str, Any]],
                      new: int) -> list[float | None]:  # fmt: skip
    """The workers' own counters: decode session-steps per forward pass (their batching) on the
    route's workers (a worker off the route only re-ran spot checks, one session at a time)."""
    out: list[float | None] = []
    for k, st in enumerate(steps):
        served = sum(1 for j in jobs if ws[k]["peer_id"] in j["route"]) * (new - 1)
        n = st.get("decode_count", 0.0)
        out.append(round(served / n, 3) if served and n else None)
    return out


def repeat_spread(ws: list[dict[str, Any]], ph: dict[str, Any], new: int) -> dict[str, Any]:
    """The real side measured twice: the even and the odd rounds as two repeats (each saw the
    same mix of the machine's load, the phases taking turns), each figure's spread between them
    (|a - b| / their mean): how far two real runs of this size disagree, the sim's best possible
    match. Per round too: its latency, token time, batching and the machine's other load."""
    halves: list[list[dict[str, Any]]] = [[], []]
    per_round = []
    for r in ph["rounds"]:
        jobs = ph["jobs"][r["first"] : r["first"] + r["jobs"]]
        halves[r["round"] % 2] += jobs
        demo = sum(v for k, v in r["cpu_s"].items() if k != "machine")
        batch = [b for b in sessions_per_pass(ws, r["steps"], jobs, new) if b is not None]
        per_round.append({
            "round": r["round"], "latency_p50_ms": statistics.median(j["latency_ms"] for j in jobs),
            "decode_ms_per_token_p50": statistics.median(
                (j["last_ms"] - j["first_ms"]) / max(j["new_tokens"] - 1, 1) for j in jobs),
            "sessions_per_pass": round(statistics.mean(batch), 3) if batch else None,
            "other_cores": round(max(0.0, r["cpu_s"].get("machine", 0.0) - demo) / r["wall_s"], 3),
            "demo_cores": round(demo / r["wall_s"], 3), "loadavg": r["loadavg"],
        })  # fmt: skip
    a, b = real_figures(halves[0]), real_figures(halves[1])
    spread = {m: {q: abs(a[m][q] - b[m][q]) / ((a[m][q] + b[m][q]) / 2) for q in a[m]} for m in a}
    return {"a": a, "b": b, "spread": spread, "rounds": per_round}


def within_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per variant: the latency and ttft figures within TARGET of the real ones, in all and among
    those the real side itself reproduces within TARGET (its two repeats agree)."""
    out = {}
    for name in rows[0]["within_target"]:
        cells = [(ok, row["repeats"]["spread"][m][q] <= TARGET) for row in rows
                 for m, qs in row["within_target"][name].items() for q, ok in qs.items()]  # fmt: skip
        out[name] = {"figures": len(cells), "within": sum(ok for ok, _ in cells),
                     "stable": sum(st for _, st in cells),
                     "within_stable": sum(ok and st for ok, st in cells)}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=Path("/tmp/dlis-sim-calibration"), help="the demo copy's DLIS_HOME")
    ap.add_argument("--reuse", action="store_true", help="a demo copy already runs in --home (with worker metrics)")
    ap.add_argument("--keep", action="store_true", help="leave the demo copy running")
    ap.add_argument("--phases", default="1:24,2:24,4:48", help="USERS:JOBS closed loops; the first calibrates")
    ap.add_argument("--rounds", type=int, default=6, help="the phases take turns this many times, JOBS/ROUNDS each")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sim_calibration.json")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="re-run the calibration and simulation on an earlier run's real side (its --out)")  # fmt: skip
    args = ap.parse_args()
    if args.rounds < 2:  # before minutes of real jobs, not after
        ap.error(f"--rounds {args.rounds}: at least 2, the real side's spread compares its even and odd rounds")
    phases = [tuple(int(x) for x in p.split(":")) for p in args.phases.split(",")]
    if phases[0][0] != 1 or any(n % args.rounds or n < args.rounds for _, n in phases):
        raise SystemExit(f"--phases must start with a sequential phase (1:N), each N a multiple of --rounds "
                         f"{args.rounds}; got {args.phases}")  # fmt: skip
    t_start, load_before = time.perf_counter(), Path("/proc/loadavg").read_text().split()[:3]
    url, rpc = f"http://127.0.0.1:{PORTS['DEMO_BROKER_PORT']}", f"http://127.0.0.1:{PORTS['DEMO_PORT']}"
    if args.from_json is not None:  # the real side of an earlier run: the model again, no new measurement
        prev = json.loads(args.from_json.read_text())
        ws, links = prev["workers"], prev["calibration"]["link_ms"]
        real: list[dict[str, Any]] = prev["real_jobs"]
        load_before, load_after, real_s = prev["load_before"], prev["load_after"], prev["real_run_s"]
        for ph in real:  # a file written before rounds were kept: equal chunks, their counters unknown
            m = len(ph["jobs"]) // args.rounds
            ph.setdefault("rounds", [{"round": k, "first": k * m, "jobs": m, "wall_s": 1.0, "loadavg": ["?"],
                                      "cpu_s": {}, "steps": [{} for _ in ws]} for k in range(args.rounds)])  # fmt: skip
        args.rounds = len(real[0]["rounds"])
        curve = {k: prev["batched"][k] for k in ("decode_ms_b1", "prefill_ms_b1")}
        curve |= {k: {int(b): v for b, v in prev["batched"][k].items()} for k in ("decode", "prefill")}
        compare(args, ws, links, real, curve, load_before, load_after, real_s, t_start)
        return
    try:  # a demo copy that failed half-way is stopped too
        if not args.reuse:
            print(f"starting the demo copy in {args.home} (scripts/demo.sh, ports {', '.join(PORTS.values())}) ...")
            demo(args.home)
        t_real = time.perf_counter()
        ws = workers(args.home)
        rtts: list[list[float]] = []
        links = hop_latency(args.home, ws, samples=rtts)
        for w, xs in zip(ws, rtts, strict=True):
            w["info_rtt_ms"] = xs
        client = Client(url, rpc)
        # warm-up at every concurrency: the first sessions, caches and each batch size's first
        # merged forward pass (a new tensor shape) are slower than the rest; none of them is measured
        for users, _ in phases:
            closed_loop(client, users, 2 * users)
            settle(ws)
        # the phases take turns, round after round: each sees the same mix of the machine's load
        real = [{"users": u, "jobs": [], "wall_s": 0.0, "steps": None, "cpu_s": {}, "rounds": []} for u, _ in phases]
        for rnd in range(args.rounds):
            for ph, (users, n) in zip(real, phases, strict=True):
                before, cpu0 = step_counters(ws), cpu_seconds(args.home)
                rq = RunQueue(args.home)
                rq.start()
                probe = LinkProbe(args.home, ws) if users == 1 else None
                if probe is not None:
                    probe.start()
                    probe.ready.wait(60)
                jobs, wall = closed_loop(client, users, n // args.rounds)
                runq = rq.result()
                if probe is not None:
                    for w, xs in zip(ws, probe.result(), strict=True):
                        w.setdefault("busy_info_rtt_ms", []).extend(xs)
                after, cpu1 = step_counters(ws), cpu_seconds(args.home)
                ph["settle_s"] = ph.get("settle_s", 0.0) + settle(ws)
                ph["cpu_s"] = {k: ph["cpu_s"].get(k, 0.0) + cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1}
                delta = [{k: a.get(k, 0.0) - b.get(k, 0.0) for k in a} for a, b in zip(after, before, strict=True)]
                ph["steps"] = delta if ph["steps"] is None else [
                    {k: d.get(k, 0.0) + s.get(k, 0.0) for k in d | s} for d, s in zip(delta, ph["steps"], strict=True)
                ]  # fmt: skip
                recs = broker_records(url, jobs)
                ph["rounds"].append({"round": rnd, "first": len(ph["jobs"]), "jobs": len(recs), "wall_s": wall,
                                     "loadavg": Path("/proc/loadavg").read_text().split()[:3],
                                     "cpu_s": {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1},
                                     "steps": delta, **runq})  # fmt: skip
                ph["jobs"] += recs
                ph["wall_s"] += wall
                print(f"real, round {rnd + 1}: {len(jobs)} jobs by {users} user(s) in {wall:.1f} s, "
                      f"latency p50 {statistics.median(j['latency_ms'] for j in recs):.0f} ms, "
                      f"load {' '.join(ph['rounds'][-1]['loadavg'])}, the demo's group share "
                      f"{runq['group_cores']:.2f} cores ({runq['other_threads']:.1f} threads of other sessions "
                      f"runnable)")  # fmt: skip
        real_s = time.perf_counter() - t_real
    finally:
        if not args.keep:
            demo(args.home, "stop", timeout_s=120)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print("measuring the stage's batch curve (real Stage, in this process) ...")
    curve = batch_costs(args.home / "shards" / MODEL)
    compare(args, ws, links, real, curve, load_before, load_after, real_s, t_start)


def compare(args: argparse.Namespace, ws: list[dict[str, Any]], links: list[float], real: list[dict[str, Any]],
            curve: dict[str, Any], load_before: list[str], load_after: list[str], real_s: float,
            t_start: float) -> None:  # fmt: skip
    """Calibrate from the real side, write the scenario, simulate every variant, print, write JSON."""
    cal = calibrate(ws, links, real[0]["steps"], real[0]["jobs"])
    batched = batched_figures(ws, real[0], curve)
    data = scenario_data(ws, cal["ms_per_layer"], links, cal, batched)
    write_calibrated(data, ws, " ".join(load_before))
    variants = {
        "calibrated": load_scenario(CALIBRATED),
        "chunked": parse_scenario(scenario_data(ws, cal["ms_per_layer"], links, cal)),
        "profiler_only": parse_scenario(scenario_data(ws, [w["profiler_ms_per_layer"] for w in ws], links, None)),
        "shipped_demo": parse_scenario({**data, "peers": yaml.safe_load(
            (ROOT / "dlis_market" / "sim" / "scenarios" / "demo.yaml").read_text())["peers"],
            "prefill_ratio": 0.1, "overheads": {}, "offers_track_load": True, "stage_model": "chunked",
            "hosts": {}, "broker_host": None}),
    }  # fmt: skip
    rows = []
    for ph in real:
        jobs = ph["jobs"]
        prompt = int(statistics.median(j["prompt_tokens"] for j in jobs))
        new = int(statistics.median(j["new_tokens"] for j in jobs))
        fig = real_figures(jobs)
        shares = [round_share(r) if "group_cores" in r else None for r in ph["rounds"]]
        sims = {name: simulated(sc, ph["users"], len(jobs) // args.rounds, prompt, new, shares)
                for name, sc in variants.items()}  # fmt: skip
        ratios = {name: {m: {q: s[m][q] / fig[m][q] for q in fig[m]} for m in fig} for name, s in sims.items()}
        real_batch = sessions_per_pass(ws, ph["steps"], jobs, new)
        rep = repeat_spread(ws, ph, new)
        worker_of = {w["peer_id"]: w["worker"] for w in ws}
        routes = _count(" -> ".join(f"w{worker_of[p]}" for p in j["route"]) for j in jobs)
        rows.append({"users": ph["users"], "jobs": len(jobs), "prompt_tokens": prompt, "new_tokens": new,
                     "wall_s": ph["wall_s"], "routes": routes, "real": fig, "sim": sims, "ratio": ratios,
                     "real_batch": real_batch, "cpu_s": ph["cpu_s"], "repeats": rep,
                     "within_target": {name: {m: {q: abs(v - 1) <= TARGET for q, v in ratios[name][m].items()}
                                              for m in ("latency_ms", "ttft_ms")} for name in ratios}})  # fmt: skip
    print(f"\nload average before {' '.join(load_before)}, after {' '.join(load_after)}; real run {real_s:.0f} s")
    print("workers: compute ms/layer (own decode passes vs profiler at start), link ms one way")
    for k, w in enumerate(ws):
        print(f"  w{w['worker']} {w['device']:6s} [{w['start']:2d},{w['end']:2d}) {w['threads']} thr: "
              f"{cal['ms_per_layer'][k]:6.2f} vs {w['profiler_ms_per_layer']:6.2f}  link {cal['link_ms'][k]:.3f}"
              f"  ({cal['ms_per_layer_source'][k]})")  # fmt: skip
    o = cal["overheads"]
    print(
        f"stage batch curve (pass of b sessions / one): decode {curve['decode']}, prefill {curve['prefill']}; "
        f"host: {batched['host_cores']:.2f} cores (the demo session's share, mean of the sequential rounds; "
        f"{os.cpu_count()} on the machine), background {batched['background']:.2f} threads, spot-check re-runs "
        f"{batched['checks_threads']:.2f}, the demo {batched['demo_cores']:.2f} cores busy (sequential phase); "
        f"token gap cv {batched['step_cv']:.3f}, per stage pass {batched['pass_cv']:.3f}"
    )
    if "worker_share" in batched:
        print(f"full speed = measured x share per worker {[round(x, 3) for x in batched['worker_share']]}, broker "
              f"{batched['broker_share']:.3f}; job spread within a round {batched['job_speed_cv']:.3f} "
              f"(over all rounds {cal['job_speed_cv']:.3f})")  # fmt: skip
    print(f"prefill ratio {cal['prefill_ratio']:.4f}; broker: admit {o['admit_ms']:.1f} ms, "
          f"open {o['open_ms']:.1f} ms, close {o['close_ms']:.1f} ms, per pass {o['pass_ms']:.2f} ms")  # fmt: skip
    print(f"\n{'users':>5s} {'figure':10s} {'q':>4s} {'real ms':>9s} {'rep A':>7s} {'rep B':>7s}"
          f" {'spread':>6s} {'calibrated':>11s} {'ratio':>6s} {'chunked':>9s} {'ratio':>6s}"
          f" {'profiler':>9s} {'ratio':>6s}")  # fmt: skip
    for row in rows:
        rep = row["repeats"]
        for m in ("latency_ms", "ttft_ms", "decode_ms_per_token"):
            for q in ("p50", "p90", "p99"):
                cells = " ".join(f"{row['sim'][v][m][q]:9.0f} {row['ratio'][v][m][q]:6.2f}"
                                 for v in ("calibrated", "chunked", "profiler_only"))  # fmt: skip
                print(f"{row['users']:5d} {m.removesuffix('_ms')[:10]:10s} {q:>4s} {row['real'][m][q]:9.0f} "
                      f"{rep['a'][m][q]:7.0f} {rep['b'][m][q]:7.0f} {rep['spread'][m][q]:6.2f}  {cells}")  # fmt: skip
        for r in rep["rounds"]:
            print(f"      round {r['round'] + 1}: latency p50 {r['latency_p50_ms']:.0f} ms, token "
                  f"{r['decode_ms_per_token_p50']:.0f} ms, sessions/pass {r['sessions_per_pass']}, other programs "
                  f"{r['other_cores']:.2f} cores, demo {r['demo_cores']:.2f}, "
                  f"load {' '.join(r['loadavg'])}")  # fmt: skip
        ok = row["within_target"]["calibrated"]
        print(
            f"      within {TARGET:.0%} (calibrated): "
            + ", ".join(f"{m.removesuffix('_ms')} {q} {'yes' if v else 'NO'}" for m in ok for q, v in ok[m].items())
        )
        print(f"      decode sessions per pass: real {row['real_batch']}, sim {row['sim']['calibrated']['batch']}")
        busy = ", ".join(f"{k} {v / row['wall_s']:.2f}" for k, v in sorted(row["cpu_s"].items()))
        print(f"      cores busy (CPU s / wall s): {busy}")
        print(f"      routes real {row['routes']}, "
              f"calibrated sim {row['sim']['calibrated']['routes']}")  # fmt: skip
    summary = within_summary(rows)
    for name, got in summary.items():
        print(f"within {TARGET:.0%} of real (latency and ttft, p50/p90/p99): {name} {got['within']} of "
              f"{got['figures']}; of the {got['stable']} figures whose two real repeats agree within "
              f"{TARGET:.0%}: {got['within_stable']}")  # fmt: skip
    report = {
        "machine": machine_info(), "summary": summary, "load_before": load_before, "load_after": load_after,
        "wall_s": time.perf_counter() - t_start, "real_run_s": real_s, "target": TARGET,
        "prompt": PROMPT, "max_tokens": MAX_TOKENS, "workers": ws, "calibration": cal,
        "scenario": str(CALIBRATED.relative_to(ROOT)), "phases": rows, "batched": batched,
        "real_jobs": [{"users": ph["users"], "jobs": ph["jobs"], "steps": ph["steps"], "cpu_s": ph["cpu_s"],
                       "wall_s": ph["wall_s"], "settle_s": ph.get("settle_s", 0.0), "rounds": ph["rounds"]}
                      for ph in real],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} and {CALIBRATED.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
