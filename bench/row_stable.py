"""Benchmark: a bf16 stage with row-stable linears only where a lone row's kernel rounds differently
(``kv_cache.stabilise_rows``, ours) against every linear row-stable (the baseline, before).

A row-stable linear computes a decode step's lone row as a batch of two, so that a bf16 session's
tokens do not depend on who else is batched; that costs 3-24 % per linear. Only linears whose
one-row kernel disagrees with the batched kernel need it (SmolLM2 on this CPU: ``down_proj``, K =
1536; the K = 576 projections agree). Both pipelines are SmolLM2 bf16, 1 stage, in this process;
rounds alternate which runs first. Prints decode tokens/s of each, the per-round speed ratio
(baseline time / ours) and whether the greedy tokens are equal; writes JSON.

    .venv/bin/python bench/row_stable.py --threads 1 --rounds 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from machine_info import machine_info  # type: ignore[import-not-found]  (bench/ is on sys.path)

from dlis_market.inference import kv_cache
from dlis_market.inference.importer import import_model
from dlis_market.inference.kv_cache import RowStableLinear
from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.shard_export import export_shards
from dlis_market.settings import Settings


def _row_stable(pipe: LocalPipeline) -> int:
    return sum(type(m) is RowStableLinear for stage in pipe.stages for m in stage.model.modules())


def _all_row_stable(pipe: LocalPipeline) -> None:
    """The baseline: the stage's own ``stabilise_rows`` with every probe answering "disagrees",
    so every plain bf16 linear of the layers is row-stable, as before the probe."""
    with mock.patch.object(kv_cache, "lone_row_agrees", lambda _linear: False):
        for stage in pipe.stages:
            kv_cache.stabilise_rows(stage.model, stage.family.layers_path + ".")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench/results/row_stable.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings.load()
    model_dir = import_model("smollm2-135m", settings.models_dir, settings.home / "cache")
    prompt = list(range(100, 132))
    with tempfile.TemporaryDirectory(prefix="dlis-bench-") as tmp:
        export_shards(model_dir, Path(tmp), stages=1, dtype="bf16")
        ours, base = LocalPipeline.load(Path(tmp)), LocalPipeline.load(Path(tmp))
    _all_row_stable(base)
    runners = {"selected": ours, "all_row_stable": base}
    tokens = {name: p.generate_ids([prompt], args.new_tokens)[0].token_ids for name, p in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    ratios = []
    load_before = list(os.getloadavg())
    for r in range(args.rounds):
        order = list(runners) if r % 2 else list(reversed(runners))
        took: dict[str, float] = {}
        for name in order:
            began = time.perf_counter()
            runners[name].generate_ids([prompt], args.new_tokens)
            took[name] = time.perf_counter() - began
            times[name].append(took[name])
        ratios.append(took["all_row_stable"] / took["selected"])
    result: dict[str, Any] = {
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "row_stable_linears": {name: _row_stable(p) for name, p in runners.items()},
        "tokens_per_s": {name: args.new_tokens / statistics.median(t) for name, t in times.items()},
        "speed_ratio_per_round": ratios,
        "speed_ratio_median": statistics.median(ratios),
        "same_greedy_tokens": tokens["selected"] == tokens["all_row_stable"],
        "load_average": [load_before, list(os.getloadavg())],
        "machine": machine_info(),
    }
    print(
        f"row-stable linears: selected {result['row_stable_linears']['selected']}, "
        f"all {result['row_stable_linears']['all_row_stable']}; tokens/s selected "
        f"{result['tokens_per_s']['selected']:.1f}, all {result['tokens_per_s']['all_row_stable']:.1f}; "
        f"speed ratio median {result['speed_ratio_median']:.3f} (rounds "
        f"{min(ratios):.3f}..{max(ratios):.3f}); same greedy tokens: {result['same_greedy_tokens']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
