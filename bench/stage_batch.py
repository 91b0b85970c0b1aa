"""Benchmark: decode passes of one stage over sessions at different positions, with the batch's KV
cache kept between passes (``inference.keep_batches``, ours) against stacking the sessions' caches
before every pass and splitting them after (the baseline, before).

A worker runs a merged group of sessions step after step in one forward pass each. Before, every
pass copied every cached token of the group twice: into a left-padded batch, and back out into
each session's own cache. Now the rows stay in the batch until the group changes. Both stages
are SmolLM2's middle range (layers 10-20, bf16) in this process, with the same weights; each
opens ``--sessions`` sessions whose prompts differ in length (so every pass is ragged, as
sessions that joined at different times are), prefills them one by one and runs ``--steps``
decode steps over all of them, in one pass each, or in ``--groups`` passes of groups that take
turns (as groups of sessions that travel the pipeline apart do); rounds alternate which runs
first. Prints ms per pass of each,
the per-round ratio (baseline time / ours) and whether the hidden states are bit-identical;
writes JSON.

    .venv/bin/python bench/stage_batch.py --sessions 8,16 --context 64,512 --groups 1,2 --rounds 6
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

import torch
from machine_info import machine_info  # type: ignore[import-not-found]  (bench/ is on sys.path)

from dlis_market.inference.importer import import_model
from dlis_market.inference.messages import StageInput
from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import Stage
from dlis_market.settings import InferenceSettings, Settings
from dlis_market.types import LayerRange

LAYERS = LayerRange(start=10, end=20)


def run(stage: Stage, sessions: int, context: int, steps: int, seed: int, groups: int) -> tuple[float, torch.Tensor]:
    """Median seconds per decode pass, and the last pass's hidden states. With ``groups`` > 1 the
    sessions run as that many groups taking turns, as groups that travel a pipeline apart do."""
    gen = torch.Generator().manual_seed(seed)
    hidden_size = int(stage.config.hidden_size)
    ids = [f"s{i}" for i in range(sessions)]
    lengths = [context - 3 * i for i in range(sessions)]  # all different: every pass is ragged
    for sid, n in zip(ids, lengths, strict=True):
        stage.open_session(sid, n + steps + 1)
        stage.forward(StageInput((sid,), (0,), 0, hidden=torch.randn(1, n, hidden_size, generator=gen).bfloat16()))
    positions = list(lengths)
    took = []
    out = None
    for step in range(steps):
        for g in range(groups):
            rows = list(range(g, sessions, groups))
            x = torch.randn(len(rows), 1, hidden_size, generator=gen).bfloat16()
            inp = StageInput(tuple(ids[r] for r in rows), tuple(positions[r] for r in rows), step + 1, hidden=x)
            began = time.perf_counter()
            out = stage.forward(inp)
            took.append(time.perf_counter() - began)
        positions = [p + 1 for p in positions]
    for sid in ids:
        stage.close_session(sid)
    assert out is not None and out.hidden is not None
    return statistics.median(took[2 * groups :]), out.hidden


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sessions", default="8,16", help="comma-separated session counts")
    ap.add_argument("--context", default="64,512", help="comma-separated prompt lengths of the longest session")
    ap.add_argument("--steps", type=int, default=24, help="decode steps per run")
    ap.add_argument("--groups", default="1,2", help="comma-separated: the sessions run in this many groups by turns")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("bench/results/stage_batch.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings.load()
    model_dir = import_model("smollm2-135m", settings.models_dir, settings.home / "cache")
    with tempfile.TemporaryDirectory(prefix="dlis-bench-") as tmp:
        export_shards(model_dir, Path(tmp), stages=3, dtype="bf16")
        stages = {
            "kept": Stage.load(Path(tmp), LAYERS, settings=InferenceSettings(keep_batches=True, max_sessions=64)),
            "restacked": Stage.load(Path(tmp), LAYERS, settings=InferenceSettings(keep_batches=False, max_sessions=64)),
        }
    load_before = list(os.getloadavg())
    rows: list[dict[str, Any]] = []
    levels = [
        (int(n), int(c), int(g))
        for n in args.sessions.split(",")
        for c in args.context.split(",")
        for g in args.groups.split(",")
    ]
    for sessions, context, groups in levels:
        ms: dict[str, list[float]] = {name: [] for name in stages}
        ratios, identical = [], True
        for r in range(args.rounds):
            order = list(stages) if r % 2 else list(reversed(stages))
            took, last = {}, {}
            for name in order:
                took[name], last[name] = run(stages[name], sessions, context, args.steps, r, groups)
                ms[name].append(1000 * took[name])
            ratios.append(took["restacked"] / took["kept"])
            identical &= torch.equal(last["kept"], last["restacked"])
        row = {
            "sessions": sessions,
            "context": context,
            "groups": groups,
            "ms_per_pass": {name: statistics.median(v) for name, v in ms.items()},
            "speed_ratio_per_round": ratios,
            "speed_ratio_median": statistics.median(ratios),
            "bit_identical": identical,
        }
        rows.append(row)
        print(
            f"{sessions:3d} sessions in {groups} group(s), context {context:4d}: "
            f"kept {row['ms_per_pass']['kept']:.2f} ms/pass, "
            f"restacked {row['ms_per_pass']['restacked']:.2f} ms/pass, speed ratio median "
            f"{row['speed_ratio_median']:.3f} ({min(ratios):.3f}..{max(ratios):.3f}); bit-identical: {identical}"
        )
    result = {
        "stage": f"smollm2-135m bf16 layers [{LAYERS.start}, {LAYERS.end})",
        "threads": args.threads,
        "steps": args.steps,
        "rounds": args.rounds,
        "rows": rows,
        "load_average": [load_before, list(os.getloadavg())],
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
