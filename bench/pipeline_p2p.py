"""Benchmark: a 3-worker loopback P2P pipeline vs single-process generation, in the same run.

    .venv/bin/python bench/pipeline_p2p.py [--dtype bf16] [--new-tokens 32] [--sessions 1,4,8]
        [--prompts same|mixed] [--batch-wait-ms MS] [--merge-groups] [--max-batch-sessions N] [--no-exact]
        [--out bench/results/pipeline_p2p.json]

Imports SmolLM2-135M (cached), exports it as 3 shards, starts 3 workers as separate processes
(``python -m dlis_market.cli.worker start``) on 127.0.0.1, then for each concurrency level runs
the same prompts through ``LocalPipeline`` (one process, same shards, batched) and through the
P2P pipeline driver (one session per prompt, concurrent). Reports tokens/s (generated tokens over
wall time, prefill included), time to first token, and the per-hop latency (half the round trip
of a small request on an open stream), and per worker, from its /metrics, how many sessions each
decode forward call carried and the share of the wall time it spent computing. Workers are killed
at the end, whatever happens.

Where the time goes: the CPU milliseconds per generated token of every process of each worker's
process group (its Python, its p2pd, its DHT process) and of the client (driver, its p2pd) over
the P2P runs, next to the single process's (``cpu_ms_per_token``), read from /proc. And whether
each session generated exactly what its prompt generates alone in one process
(``sessions_not_as_alone``: 0 is the claim).

``--prompts same`` cuts every prompt to the shortest one, so sessions can sit at the same
position; ``mixed`` keeps their own lengths (5-9 tokens), so they never do. The JSON records the
machine and the load average before and after (the machine may be shared).
"""

from __future__ import annotations

import os

# Before torch loads: idle OpenMP threads must sleep, not spin, or the stages (and this process's
# baseline) steal each other's cores on a small or shared machine. Both sides get the same policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration" / "node"))
sys.path.insert(0, str(ROOT / "bench"))

from machine_info import machine_info  # noqa: E402  (bench/ is on sys.path)
from node_helpers import Swarm, driver_settings, wait_for_spans  # noqa: E402

import dlis_market  # noqa: E402
from dlis_market.inference.importer import import_model  # noqa: E402
from dlis_market.inference.pipeline import LocalPipeline  # noqa: E402
from dlis_market.inference.shard_export import export_shards  # noqa: E402
from dlis_market.node.driver import JobSession, JobSpec, PipelineDriver  # noqa: E402
from dlis_market.settings import InferenceSettings  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "dlis-test-cache" / "v1"
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "In machine learning, a transformer is",
    "The three primary colors are",
    "To bake bread you need",
    "The largest planet in the solar system is",
    "A haiku about autumn:",
    "Python is a programming language that",
]


def local_run(pipe: LocalPipeline, prompts: list[list[int]], new: int) -> dict[str, float]:
    t, cpu = time.perf_counter(), time.process_time()
    gens = pipe.generate_ids(prompts, new)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    tokens = sum(len(g.token_ids) for g in gens)
    return {
        "tokens_per_s": tokens / wall,
        "ttft_s": statistics.mean(g.ttft_s for g in gens),
        "wall_s": wall,
        "cpu_ms_per_token": cpu * 1000 / tokens,
    }


async def p2p_run(
    driver: PipelineDriver, model: str, prompts: list[list[int]], new: int, outputs: list[list[int]] | None = None
) -> dict[str, float]:
    """``outputs``, when given, gets each session's generated ids (to compare with the session alone)."""

    async def one(prompt: list[int]) -> tuple[list[int], float]:
        session: JobSession = await driver.open_job(JobSpec(model=model, prompt_ids=prompt, max_new_tokens=new))
        started = time.perf_counter()
        first = 0.0
        ids: list[int] = []
        async for token in session.tokens():
            ids.append(token)
            if len(ids) == 1:
                first = time.perf_counter() - started
        await session.close()
        return ids, first

    t = time.perf_counter()
    async with asyncio.TaskGroup() as group:  # one failed session cancels the others (no orphans)
        tasks = [group.create_task(one(p)) for p in prompts]
    results = [task.result() for task in tasks]
    wall = time.perf_counter() - t
    if outputs is not None:
        outputs.extend(ids for ids, _ in results)
    tokens = sum(len(ids) for ids, _ in results)
    return {"tokens_per_s": tokens / wall, "ttft_s": statistics.mean(f for _, f in results), "wall_s": wall}


def _stat(pid: str) -> tuple[int, str, float] | None:
    """(process group, command name, CPU seconds) of one process, from /proc (None: it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # exited between the listing and the read
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[2]), comm, (int(fields[11]) + int(fields[12])) / ticks


def group_cpu(groups: dict[str, int]) -> dict[str, dict[str, float]]:
    """CPU seconds used so far, per named process group and command (python, p2pd...).

    The workers run in process groups of their own (with their DHT process and p2pd); the bench's
    group holds the driver, its DHT process and p2pd, and the single-process baseline.
    """
    names = {pgid: name for name, pgid in groups.items()}
    out: dict[str, dict[str, float]] = {name: {} for name in groups}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or (st := _stat(pid)) is None or st[0] not in names:
            continue
        per = out[names[st[0]]]
        per[st[1]] = per.get(st[1], 0.0) + st[2]
    return out


def cpu_per_token(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], tokens: int) -> Any:
    """CPU milliseconds per generated token, per process group and command, between two samples."""
    return {
        g: {c: round((s - before[g].get(c, 0.0)) * 1000 / tokens, 2) for c, s in per.items()}
        for g, per in after.items()
    }


def step_counters(metrics_url: str) -> dict[str, float]:
    """``{phase}_count`` and ``{phase}_s`` of the worker's stage-step histogram (one sample per call)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:  # 127.0.0.1 only
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for phase in ("decode", "prefill"):
            tag = f'{{phase="{phase}"}} '
            if line.startswith("dlis_worker_stage_step_seconds_count" + tag):
                out[f"{phase}_count"] = float(line.split()[-1])
            elif line.startswith("dlis_worker_stage_step_seconds_sum" + tag):
                out[f"{phase}_s"] = float(line.split()[-1])
    return out


def worker_load(
    before: list[dict[str, float]], after: list[dict[str, float]], decode_steps: int, wall_s: float
) -> list[dict[str, float]]:
    """Per worker: sessions per decode call and the share of ``wall_s`` spent in forward calls.

    A call is one ``Stage.forward`` of a merged batch; before continuous batching a call still ran
    one forward pass per position inside.
    """
    rows = []
    for b, a in zip(before, after, strict=True):
        d = {k: a.get(k, 0.0) - b.get(k, 0.0) for k in ("decode_count", "decode_s", "prefill_count", "prefill_s")}
        rows.append(
            {
                "decode_calls": d["decode_count"],
                "sessions_per_decode_call": decode_steps / d["decode_count"] if d["decode_count"] else 0.0,
                "busy_share": (d["decode_s"] + d["prefill_s"]) / wall_s,
            }
        )
    return rows


async def hop_latency(driver: PipelineDriver, peers: list[str], repeats: int = 50) -> dict[str, float]:
    out = {}
    for peer in peers:
        await driver.pool.request(peer, "info", {}, 10)
        t = time.perf_counter()
        for _ in range(repeats):
            await driver.pool.request(peer, "info", {}, 10)
        out[peer[-8:]] = (time.perf_counter() - t) / repeats / 2 * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--sessions", default="1,4,8")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per worker and for the baseline")
    ap.add_argument("--worker-threads", type=int, default=None, help="torch threads per worker (default: --threads)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per level; the best is kept")
    ap.add_argument("--prompts", default="same", choices=["same", "mixed"], help="cut to one length, or keep each")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--batch-wait-ms", type=float, default=None, help="workers' node.batch_wait_ms (default: theirs)")
    ap.add_argument(
        "--merge-groups", action="store_true", help="workers' node.merge_groups: merge sessions into one pass"
    )
    ap.add_argument(
        "--max-batch-sessions", type=int, default=None, help="workers' node.max_batch_sessions (default: theirs, 16)"
    )
    ap.add_argument("--no-exact", action="store_true", help="skip comparing each session with its prompt alone")
    args = ap.parse_args()
    # A SIGTERM (`timeout`, a CI limit) unwinds like Ctrl-C, so the Swarm's exit kills the workers,
    # which run in process groups of their own and would otherwise outlive the bench.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.sessions.split(",")]
    model_dir = import_model("smollm2-135m", CACHE / "models", CACHE / "cache")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    encoded = [list(tok(p)["input_ids"]) for p in PROMPTS]
    # "same": one length for every prompt, so sessions that start together stay at the same
    # position. "mixed": each prompt keeps its length, so sessions never share a position.
    length = min(len(p) for p in encoded)
    prompts = [p[:length] for p in encoded] if args.prompts == "same" else encoded
    results: dict[str, Any] = {
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "worker_threads": args.worker_threads or args.threads,
        "prompts": args.prompts,
        "prompt_tokens": [len(p) for p in prompts],
        "machine": machine_info(),
        "loadavg_before": os.getloadavg(),
        # The workers run ``python -m`` here, so they import dlis_market from this directory first;
        # to compare two checkouts, run the bench from each one's root.
        "cwd": os.getcwd(),
        "dlis_market": str(Path(dlis_market.__file__).parent),
    }
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_shards(model_dir, Path(tmp) / "shards", stages=3, dtype=args.dtype)
        ranges = [f"{s.layers.start}:{s.layers.end}" for s in manifest.stages]
        # A free metrics port per worker: the bench reads each stage's forward calls from it.
        env = {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"], "DLIS_NODE__METRICS_PORT": "0"}
        if args.batch_wait_ms is not None:
            env["DLIS_NODE__BATCH_WAIT_MS"] = str(args.batch_wait_ms)
        # The bench's driver is one opener holding every session: past the defaults (16 slots, 8 per
        # opener) the workers are set to hold the largest level, as an operator would for such a load.
        most = max(levels)
        if most > 8:
            env["DLIS_NODE__MAX_SESSIONS_PER_OPENER"] = str(most)
            env["DLIS_INFERENCE__MAX_SESSIONS"] = str(max(most, 16))
        if args.merge_groups:
            env["DLIS_NODE__MERGE_GROUPS"] = "true"
        if args.max_batch_sessions is not None:
            env["DLIS_NODE__MAX_BATCH_SESSIONS"] = str(args.max_batch_sessions)
        results["max_batch_sessions"] = args.max_batch_sessions
        results["batch_wait_ms"] = args.batch_wait_ms
        results["merge_groups"] = args.merge_groups
        results["omp_wait_policy"] = env["OMP_WAIT_POLICY"]
        with Swarm(Path(tmp) / "swarm", threads=args.worker_threads or args.threads, env=env) as swarm:
            workers = swarm.start_workers([(Path(tmp) / "shards", r, f"w{i}") for i, r in enumerate(ranges)])
            pipe = LocalPipeline.load(Path(tmp) / "shards", InferenceSettings(max_sessions=max(most, 16)))
            local_run(pipe, prompts[:1], 4)  # warm-up
            # each prompt alone, in one process: what every P2P session must generate, batched or not
            alone = (
                {}
                if args.no_exact
                else {tuple(p): pipe.generate_ids([p], args.new_tokens)[0].token_ids for p in prompts}
            )
            groups = {f"worker{i}": w.proc.pid for i, w in enumerate(workers)} | {"client": os.getpgrp()}

            async def p2p_all() -> None:
                driver = await PipelineDriver.create(swarm.initial_peers, driver_settings())
                try:
                    await wait_for_spans(driver, manifest.model_name, 3)
                    await p2p_run(driver, manifest.model_name, prompts[:1], 4)  # warm-up, opens streams
                    results["hop_latency_ms"] = await hop_latency(driver, [w.peer_id for w in workers])
                    for n in levels:
                        batch = [prompts[i % len(prompts)] for i in range(n)]
                        # Alternate and keep the best of each: the machine is shared and noisy.
                        runs_local, runs_p2p = [], []
                        urls = [str(w.info["metrics_url"]) for w in workers]
                        counters = [step_counters(u) for u in urls]
                        cpu: dict[str, dict[str, float]] = {}
                        mismatched = 0
                        for _ in range(args.repeats):
                            runs_local.append(local_run(pipe, batch, args.new_tokens))
                            outputs: list[list[int]] = []
                            before = group_cpu(groups)
                            runs_p2p.append(await p2p_run(driver, manifest.model_name, batch, args.new_tokens, outputs))
                            used = cpu_per_token(before, group_cpu(groups), sum(len(o) for o in outputs))
                            for g, per in used.items():  # summed over the repeats, averaged below
                                for c, ms in per.items():
                                    cpu.setdefault(g, {})[c] = cpu.get(g, {}).get(c, 0.0) + ms / args.repeats
                            mismatched += sum(
                                bool(alone) and o != alone[tuple(p)] for o, p in zip(outputs, batch, strict=True)
                            )
                        local = max(runs_local, key=lambda r: r["tokens_per_s"])
                        p2p = max(runs_p2p, key=lambda r: r["tokens_per_s"])
                        one = results.get("sessions_1")
                        load = worker_load(
                            counters,
                            [step_counters(u) for u in urls],
                            sum(round(r["tokens_per_s"] * r["wall_s"]) - n for r in runs_p2p),  # decode steps
                            sum(r["wall_s"] for r in runs_p2p),
                        )
                        results[f"sessions_{n}"] = {
                            "single_process": local,
                            "p2p_3_workers": p2p,
                            "ratio": p2p["tokens_per_s"] / local["tokens_per_s"],
                            "p2p_workers": load,
                            # CPU ms per generated token of every process (python, p2pd, ...) of each
                            # worker and of the client, over the P2P runs; the baseline's is in single_process
                            "p2p_cpu_ms_per_token": {
                                g: {c: round(v, 2) for c, v in per.items()} for g, per in cpu.items()
                            },
                            "p2p_cpu_ms_per_token_total": round(
                                sum(v for per in cpu.values() for v in per.values()), 2
                            ),
                            "sessions_not_as_alone": None if not alone else mismatched,
                            "p2p_vs_1_session": (
                                p2p["tokens_per_s"] / one["p2p_3_workers"]["tokens_per_s"] if one else 1.0
                            ),
                            "local_vs_1_session": (
                                local["tokens_per_s"] / one["single_process"]["tokens_per_s"] if one else 1.0
                            ),
                        }
                        print(json.dumps({n: results[f"sessions_{n}"]}), flush=True)
                finally:
                    await driver.close()

            asyncio.run(p2p_all())
    results["loadavg_after"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
