"""Benchmark: privacy=high jobs (first stage on secret shares) vs plain jobs, through P2P workers.

SmolLM2-135M exported as a 1-layer first stage [0, 1) and the rest [1, 30) (bf16 or fp32). Two
workers serve [0, 1) (the share workers), one serves [1, 30). In one run, alternating rounds:

- plain: the driver routes [0, 1) -> [1, 30) (token ids go to the first worker);
- private: the driver embeds the prompt and runs layer 0 itself with each of its 7 projections
  on two additive shares at the two share workers (``node/private_entry.py``), then sends the
  hidden state to [1, 30).

Prints tokens/s, time to first token, the share bytes sent per token, the ratio private / plain
and how many greedy tokens agree, and writes JSON.

    .venv/bin/python bench/private_jobs.py --out bench/results/private_jobs.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration" / "node"))
sys.path.insert(0, str(ROOT / "bench"))

from machine_info import write_result  # noqa: E402  (bench/ is on sys.path)
from node_helpers import Swarm, _wait_ready, driver_settings, wait_for_spans  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from dlis_market.inference.importer import import_model  # noqa: E402
from dlis_market.inference.shard_export import export_shards  # noqa: E402
from dlis_market.inference.stage import Stage  # noqa: E402
from dlis_market.node.driver import JobSpec, PipelineDriver  # noqa: E402
from dlis_market.node.private_entry import PrivateEntry  # noqa: E402
from dlis_market.types import LayerRange  # noqa: E402

MODEL = "smollm2-private-bench"
PROMPT = "Patient record: the blood test on 12 March showed elevated glucose and the doctor advised"


async def one_job(driver: PipelineDriver, shards: Path, ids: list[int], new: int, private: bool) -> dict[str, Any]:
    entry = PrivateEntry(await asyncio.to_thread(Stage.load, shards, None, 0)) if private else None
    spec = JobSpec(MODEL, ids, new, num_layers=30, private=entry)
    began = time.perf_counter()
    session = await driver.open_job(spec)
    tokens: list[int] = []
    ttft = 0.0
    async for t in session.tokens():
        if not tokens:
            ttft = time.perf_counter() - began
        tokens.append(t)
    wall = time.perf_counter() - began
    share_bytes = session.shares.layers.bytes_sent if session.shares and session.shares.layers else 0
    receipts = await session.close()
    decode_s = (wall - ttft) / max(len(tokens) - 1, 1)
    return {
        "tokens": tokens, "wall_s": wall, "ttft_s": ttft, "decode_ms_per_token": decode_s * 1000,
        "tokens_per_s": len(tokens) / wall, "share_bytes": share_bytes, "receipts": len(receipts),
    }  # fmt: skip


async def run(args: argparse.Namespace, shards: Path, swarm: Swarm) -> dict[str, Any]:
    tok = AutoTokenizer.from_pretrained(str(shards))
    ids = tok(PROMPT)["input_ids"]
    driver = await PipelineDriver.create(swarm.initial_peers, driver_settings(step_timeout_s=120.0))
    try:
        await wait_for_spans(driver, MODEL, 3, timeout_s=120)
        sides: dict[str, list[dict[str, Any]]] = {"plain": [], "private": []}
        for r in range(args.rounds + 1):  # round 0 warms both paths up and is not counted
            for name in ("plain", "private") if r % 2 == 0 else ("private", "plain"):
                got = await one_job(driver, shards, ids, args.new_tokens, name == "private")
                if r:
                    sides[name].append(got)
                print(f"round {r} {name}: {got['tokens_per_s']:.2f} tok/s, ttft {got['ttft_s'] * 1000:.0f} ms, "
                      f"decode {got['decode_ms_per_token']:.1f} ms/token", flush=True)  # fmt: skip
    finally:
        await driver.close()

    def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
            "ttft_ms": statistics.median(x["ttft_s"] for x in runs) * 1000,
            "decode_ms_per_token": statistics.median(x["decode_ms_per_token"] for x in runs),
            "share_bytes_per_token": statistics.median(x["share_bytes"] for x in runs)
            / (len(ids) + args.new_tokens - 1),
            "receipts": runs[0]["receipts"],
        }

    plain, private = summary(sides["plain"]), summary(sides["private"])
    same = sum(a == b for a, b in zip(sides["plain"][0]["tokens"], sides["private"][0]["tokens"], strict=True))
    return {
        "dtype": args.dtype, "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "rounds": args.rounds,
        "plain": plain, "private": private,
        "ratio_tokens_per_s": private["tokens_per_s"] / plain["tokens_per_s"],
        "extra_ttft_ms": private["ttft_ms"] - plain["ttft_ms"],
        "extra_decode_ms_per_token": private["decode_ms_per_token"] - plain["decode_ms_per_token"],
        "greedy_tokens_equal": f"{same}/{args.new_tokens}",
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "private_jobs.json")
    args = ap.parse_args()
    cache = Path(tempfile.gettempdir()) / "dlis-test-cache" / "v1"  # the tests' model cache
    with tempfile.TemporaryDirectory(prefix="dlis-private-bench-") as tmp:
        shards = Path(tmp) / "shards"
        model_dir = import_model("smollm2-135m", cache / "models", cache / "cache")
        ranges = [LayerRange(start=0, end=1), LayerRange(start=1, end=30)]
        export_shards(model_dir, shards, ranges=ranges, dtype=args.dtype, name=MODEL)
        AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(shards))
        with Swarm(Path(tmp) / "swarm") as swarm:
            workers = [swarm.launch(shards, layers, name) for name, layers in (("s1", "0:1"), ("s2", "0:1"),
                                                                                ("r", "1:30"))]  # fmt: skip
            for w in workers:
                w.info = _wait_ready(w.proc, 300, w.log_path)
            result = asyncio.run(run(args, shards, swarm))
    for name in ("plain", "private"):
        x = result[name]
        kib = x["share_bytes_per_token"] / 1024
        print(f"{name:8s} {x['tokens_per_s']:.2f} tok/s, ttft {x['ttft_ms']:.0f} ms, decode "
              f"{x['decode_ms_per_token']:.1f} ms/token, {kib:.1f} KiB shares/token")  # fmt: skip
    ratio, same = result["ratio_tokens_per_s"], result["greedy_tokens_equal"]
    print(f"private / plain tokens/s {ratio:.2f}; greedy tokens equal {same}")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
