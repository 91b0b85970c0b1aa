"""Benchmark: activation fingerprints (one prefill) vs decode replay (today's spot check), in one run.

    .venv/bin/python bench/fingerprints.py [--prompts 24] [--new-tokens 32] [--out bench/results/fingerprints.json]

SmolLM2-135M in 3 stages ([0, 10), [10, 20), [20, 30)), exported as fp32, bf16, int8 and nf4
shards. Every job is decoded one token at a time through the committing dtype's stages, each with
a :class:`FingerprintRecorder` (greedy for even prompts, seeded top-p sampling for odd ones), and
every stage call is then checked on separately loaded validator stages with :func:`check_call`.

* **Size**: fingerprint bytes per token.
* **Prover overhead**: time in ``observe`` + ``finish`` over the stage's own ``forward`` time.
* **Validation vs re-execution**: ``check_call`` (one prefill + compare) against a decode replay
  of the same call on the validator (fresh session, one forward per step, as spot checks do).
* **False accusations** on honest pairs (committer -> validator): fp32->fp32, bf16->bf16,
  bf16->fp32, int8->int8, nf4->nf4, judged with the claimed dtype's thresholds; per measure the
  worst value over all chunks against its limit (margin < 1 passes).
* **Detection**: ``--byzantine`` noise (node/byzantine.py, every step) at stage 0 and 1, shifted
  token ids at stage 2, and int8 / nf4 served as bf16 (checked by a bf16 validator): share of
  calls rejected, and the smallest margin of a cheating call (> 1 rejected).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import machine_info  # type: ignore[import-not-found]

from dlis_market.inference.fingerprint_check import FingerprintRecorder, check_call
from dlis_market.inference.importer import import_model
from dlis_market.inference.messages import StageInput
from dlis_market.inference.sampling import SamplingParams
from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import Stage
from dlis_market.node.byzantine import corrupt
from dlis_market.protocol.fingerprint_thresholds import THRESHOLDS, Thresholds
from dlis_market.protocol.fingerprints import FingerprintBuilder

CACHE = Path(tempfile.gettempdir()) / "dlis-test-cache" / "v1"
PROMPTS = [
    "The capital of France is",
    "A haiku about autumn:",
    "To bake bread you need",
    "Python is a language that",
    "Write a short story about a robot who learns to paint. Once upon a time",
    "The three laws of thermodynamics are",
    "My favourite recipe for pancakes starts with",
    "In 1969, the first humans",
    "Explain photosynthesis to a child:",
    "The best way to learn a new language is",
    "Here is a list of prime numbers: 2, 3, 5,",
    "def fibonacci(n):",
    "The weather today is",
    "Dear customer, we regret to inform you that",
    "The mitochondria is the",
    "Once there was a small village by the sea where",
    "Q: What is the tallest mountain on Earth?\nA:",
    "A good night's sleep helps",
    "The stock market fell sharply because",
    "Translate to French: I love reading books.",
    "Water boils at",
    "The history of the Roman Empire begins",
    "SELECT name FROM users WHERE",
    "Ten tips for a productive morning: 1.",
    "The cat sat on the",
    "Music theory says a major chord has",
    "An interesting fact about octopuses is",
    "The recipe calls for two cups of",
]
HONEST = [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"), ("int8", "int8"), ("nf4", "nf4")]
CHEATS = [
    ("int8", "bf16"),
    ("nf4", "bf16"),
    ("bf16", "fp32"),
    ("nf4", "int8"),
]  # (what the worker runs, what it claims)


@dataclass
class Call:
    """One job through every stage: per stage its inputs, fingerprint and timings."""

    sampling: SamplingParams
    tokens: list[int] = field(default_factory=list)
    inputs: list[list[torch.Tensor]] = field(default_factory=list)
    fingerprints: list[bytes] = field(default_factory=list)
    forward_s: list[float] = field(default_factory=list)
    fingerprint_s: list[float] = field(default_factory=list)

    def stage_inputs(self, k: int) -> torch.Tensor:
        return torch.cat(self.inputs[k], dim=0)


def run_call(
    stages: list[Stage], recorders: list[FingerprintRecorder], prompt: list[int], new: int,
    sampling: SamplingParams, cheat: tuple[str, int] | None = None,
) -> Call:  # fmt: skip
    """Decode ``new`` tokens one step at a time; ``cheat`` = (mode, stage): ``noise`` corrupts
    that stage's hidden states at every step as ``--byzantine`` does (and commits to what it sent),
    ``shift`` the last stage's token ids."""
    sid = f"bench-{uuid.uuid4().hex[:12]}"
    n = len(stages)
    call = Call(sampling, inputs=[[] for _ in stages], forward_s=[0.0] * n, fingerprint_s=[0.0] * n)
    cheater = FingerprintBuilder() if cheat and cheat[0] == "noise" else None
    vocab = int(stages[-1].config.vocab_size)
    for st in stages:
        st.open_session(sid, len(prompt) + new, sampling)
    try:
        ids, pos = torch.tensor([prompt]), 0
        for step in range(new):
            inp = StageInput((sid,), (pos,), step, token_ids=ids)
            for k, st in enumerate(stages):
                data = inp.token_ids if st.is_first else inp.hidden
                assert data is not None
                call.inputs[k].append(data[0])
                t = time.perf_counter()
                out = st.forward(inp)
                t1 = time.perf_counter()
                recorders[k].observe(inp)
                call.forward_s[k] += t1 - t
                call.fingerprint_s[k] += time.perf_counter() - t1
                if cheat and cheat[1] == k:
                    out = corrupt(out, 1.0, vocab)
                    if cheater is not None and out.hidden is not None:
                        cheater.add(out.hidden[0])
                if out.hidden is not None:
                    inp = StageInput((sid,), (pos,), step, hidden=out.hidden)
            assert out.token_ids is not None
            call.tokens.append(int(out.token_ids[0]))
            pos += ids.shape[1]
            ids = torch.tensor([[call.tokens[-1]]])
        for k in range(n):
            t = time.perf_counter()
            call.fingerprints.append(recorders[k].finish(sid))
            call.fingerprint_s[k] += time.perf_counter() - t
        if cheat and cheater is not None:
            call.fingerprints[cheat[1]] = cheater.finish().to_bytes()
    finally:
        for st in stages:
            st.close_session(sid)
    return call


def replay(stage: Stage, call: Call, k: int) -> float:
    """Seconds to re-execute stage ``k``'s call step by step on ``stage`` (today's spot check)."""
    sid = f"replay-{uuid.uuid4().hex[:12]}"
    steps = call.inputs[k]
    stage.open_session(sid, sum(int(s.shape[0]) for s in steps) + 1, call.sampling)
    t = time.perf_counter()
    try:
        pos = 0
        for step, data in enumerate(steps):
            if stage.is_first:
                inp = StageInput((sid,), (pos,), step, token_ids=data.unsqueeze(0))
            else:
                inp = StageInput((sid,), (pos,), step, hidden=data.unsqueeze(0))
            stage.forward(inp)
            pos += int(data.shape[0])
    finally:
        stage.close_session(sid)
    return time.perf_counter() - t


MEASURES = ("exp_mismatch_frac", "mant_err_mean", "mant_err_median", "worst_token_err")


def worst(check: Any) -> dict[str, float]:
    """Per measure, the worst chunk of a call."""
    chunks = check.fingerprint.chunks
    return {
        "exp_mismatch_frac": max(c.exp_mismatches / c.compared for c in chunks),
        "mant_err_mean": max(c.mant_err_mean for c in chunks),
        "mant_err_median": max(c.mant_err_median for c in chunks),
        "worst_token_err": max(c.worst_token_err for c in chunks),
    }


def limits(th: Thresholds) -> dict[str, float]:
    return dict(zip(MEASURES, (th.max_exp_mismatch_frac, th.max_mant_err_mean, th.max_mant_err_median,
                               th.max_token_err), strict=True))  # fmt: skip


def judge_calls(validators: list[Stage], calls: list[Call], claimed: str, stages: list[int]) -> dict[str, Any]:
    th = THRESHOLDS[claimed]
    rows: dict[str, Any] = {}
    for k in stages:
        checks = [
            check_call(validators[k], c.stage_inputs(k), c.fingerprints[k], th, c.tokens, c.sampling) for c in calls
        ]
        per_measure = [worst(ch) for ch in checks]
        rows[f"stage{k}"] = {
            "calls": len(checks),
            "rejected": sum(not ch.accepted for ch in checks),
            "rejected_by_fingerprint": sum(not ch.fingerprint.accepted for ch in checks),
            "token_flips_max": max(ch.token_flips for ch in checks),
            "implausible_tokens_max": max(ch.implausible_tokens for ch in checks),
            "token_flips_total": sum(ch.token_flips for ch in checks),
            "tokens_checked": sum(ch.tokens_checked for ch in checks),
            "margin_max": max(ch.fingerprint.margin for ch in checks),
            "margin_min": min(ch.fingerprint.margin for ch in checks),
            "worst": {m: max(w[m] for w in per_measure) for m in MEASURES},
            "best": {m: min(w[m] for w in per_measure) for m in MEASURES},
            "prefill_s_median": statistics.median(ch.prefill_s for ch in checks),
            "reasons": sorted({ch.reason for ch in checks if not ch.accepted})[:4],
        }
    return {"claimed": claimed, "limits": limits(th), **rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--replays", type=int, default=8, help="calls re-executed per stage for the timing baseline")
    ap.add_argument("--shards", type=Path, default=Path(tempfile.gettempdir()) / "dlis-bench-fingerprints")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fingerprints.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread gives stable ratios
    model_dir = import_model("smollm2-135m", CACHE / "models", CACHE / "cache")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [list(tok(p)["input_ids"]) for p in (PROMPTS * 4)[: args.prompts]]
    samplings = [
        SamplingParams() if i % 2 == 0 else SamplingParams(greedy=False, temperature=0.8, top_p=0.95, seed=i)
        for i in range(len(prompts))
    ]
    load: dict[str, list[Stage]] = {}
    for dtype in ("fp32", "bf16", "int8", "nf4"):
        shard_dir = args.shards / dtype
        if not (shard_dir / "manifest.json").is_file():
            export_shards(model_dir, shard_dir, stages=3, dtype=dtype)  # type: ignore[arg-type]
        load[dtype] = [Stage.load(shard_dir, index=i) for i in range(3)]
    validators = {d: [Stage.load(args.shards / d, index=i) for i in range(3)] for d in load}
    results: dict[str, Any] = {
        "model": "smollm2-135m", "stages": ["0:10", "10:20", "20:30"], "prompts": len(prompts),
        "new_tokens": args.new_tokens, "sampling": "greedy (even prompts), T=0.8 top-p 0.95 seeded (odd)",
        "machine": machine_info(), "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "thresholds": {d: limits(t) for d, t in THRESHOLDS.items()},
    }  # fmt: skip

    calls: dict[str, list[Call]] = {}
    for dtype, stages in load.items():
        recorders = [FingerprintRecorder(st) for st in stages]
        t = time.perf_counter()
        calls[dtype] = [
            run_call(stages, recorders, p, args.new_tokens, s) for p, s in zip(prompts, samplings, strict=True)
        ]
        print(f"{dtype}: {len(prompts)} jobs decoded in {time.perf_counter() - t:.1f}s", flush=True)
        for r in recorders:
            r.close()
    positions = [sum(int(x.shape[0]) for x in c.inputs[0]) for c in calls["bf16"]]
    sizes = [len(c.fingerprints[1]) for c in calls["bf16"]]
    results["size"] = {
        "bytes_per_token_mean": statistics.mean(s / n for s, n in zip(sizes, positions, strict=True)),
        "bytes_per_call_median": statistics.median(sizes),
        "positions_per_call_median": statistics.median(positions),
        "raw_bf16_hidden_bytes_per_token": 576 * 2,
    }
    results["prover_overhead"] = {
        d: {
            f"stage{k}": {
                "fingerprint_s_per_call": statistics.median(c.fingerprint_s[k] for c in cs),
                "forward_s_per_call": statistics.median(c.forward_s[k] for c in cs),
                "overhead_pct": 100 * sum(c.fingerprint_s[k] for c in cs) / sum(c.forward_s[k] for c in cs),
            }
            for k in range(3)
        }
        for d, cs in calls.items()
    }
    print(json.dumps({"size": results["size"], "prover_overhead": results["prover_overhead"]}), flush=True)

    results["honest"] = {}
    for committer, validator in HONEST:
        row = judge_calls(validators[validator], calls[committer], committer, [0, 1, 2])
        results["honest"][f"{committer}->{validator}"] = row
        print(json.dumps({f"honest {committer}->{validator}": row}), flush=True)

    timing = {}
    for committer, validator in [("bf16", "bf16"), ("fp32", "fp32")]:
        for k in range(3):
            subset = calls[committer][: args.replays]
            th = THRESHOLDS[committer]
            val = [check_call(validators[validator][k], c.stage_inputs(k), c.fingerprints[k], th, c.tokens,
                              c.sampling).prefill_s for c in subset]  # fmt: skip
            rep = [replay(validators[validator][k], c, k) for c in subset]
            timing[f"{committer}->{validator} stage{k}"] = {
                "validate_s_median": statistics.median(val),
                "replay_s_median": statistics.median(rep),
                "speedup": statistics.median(rep) / statistics.median(val),
            }
    results["validation_vs_replay"] = timing
    print(json.dumps({"validation_vs_replay": timing}), flush=True)

    detect: dict[str, Any] = {}
    bf16 = load["bf16"]
    for mode, k in [("noise", 0), ("noise", 1), ("shift", 2)]:
        recorders = [FingerprintRecorder(st) for st in bf16]
        cheats = [
            run_call(bf16, recorders, p, args.new_tokens, s, (mode, k)) for p, s in zip(prompts, samplings, strict=True)
        ]
        for r in recorders:
            r.close()
        detect[f"byzantine {mode} at stage{k}"] = judge_calls(validators["bf16"], cheats, "bf16", [k])
        print(json.dumps({f"byzantine {mode} {k}": detect[f"byzantine {mode} at stage{k}"]}), flush=True)
    for runs, claims in CHEATS:
        detect[f"{runs} claimed as {claims}"] = judge_calls(validators[claims], calls[runs], claims, [0, 1, 2])
        print(json.dumps({f"{runs} as {claims}": detect[f"{runs} claimed as {claims}"]}), flush=True)
    results["detection"] = detect
    results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    text = json.dumps(results, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
