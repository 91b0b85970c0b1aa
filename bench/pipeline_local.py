"""Benchmark: HF generate vs the in-process pipeline (1 and 3 stages) for SmolLM2-135M.

For each dtype (fp32, bf16, int8, nf4) it measures greedy decode tokens/s and time to first token
(TTFT) of transformers ``generate`` and of ``LocalPipeline`` with 1 and 3 stages, all in this
process and this run, and prints them as ratios to HF generate. Peak RSS per stage is measured in
a fresh child process per stage (load the stage + one prefill), minus the RSS of a child that only
imports the libraries. Results go to JSON.

    .venv/bin/python bench/pipeline_local.py --new-tokens 32 --out bench/results/pipeline_local.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from machine_info import machine_info  # type: ignore[import-not-found]  (bench/ is on sys.path)
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from dlis_market.inference.importer import import_model
from dlis_market.inference.messages import StageInput, StageOutput, bytes_per_token
from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.quantization import compute_dtype
from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import Stage
from dlis_market.settings import Settings

PROMPT = "Write a short story about a robot who learns to paint. Once upon a time"


def _hf_model(model_dir: Path, dtype: str) -> Any:
    if dtype == "fp32":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if dtype == "bf16":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    quant = (
        BitsAndBytesConfig(load_in_8bit=True)
        if dtype == "int8"
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    )
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16)


class _FirstTokenTimer:
    """A generate streamer that records when the first new token arrives (the prompt comes first)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def bench_hf(model_dir: Path, dtype: str, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    model = _hf_model(model_dir, dtype).eval()
    ids = torch.tensor([prompt])
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}

    def run(n: int) -> tuple[float, float]:
        timer = _FirstTokenTimer()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, streamer=timer, **kwargs)
        total = time.perf_counter() - start
        assert out.shape[1] == len(prompt) + n and timer.first is not None
        return timer.first - start, total

    run(2)  # warm-up
    runs = [run(new_tokens) for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    return {"ttft_s": ttft, "tokens_per_s": (new_tokens - 1) / (total - ttft)}


def bench_pipeline(shard_dir: Path, prompt: list[int], new_tokens: int, repeats: int) -> dict[str, float]:
    pipe = LocalPipeline.load(shard_dir)
    pipe.generate_ids([prompt], 2)  # warm-up
    runs = [pipe.generate_ids([prompt], new_tokens)[0] for _ in range(repeats)]
    assert all(len(g.token_ids) == new_tokens for g in runs)
    ttft = statistics.median(g.ttft_s for g in runs)
    total = statistics.median(g.total_s for g in runs)
    return {"ttft_s": ttft, "tokens_per_s": (new_tokens - 1) / (total - ttft)}


def _child_rss(shard_dir: str | None, index: int, prompt: list[int], queue: Any) -> None:
    if shard_dir is not None:
        stage = Stage.load(Path(shard_dir), index=index)
        stage.open_session("rss", len(prompt) + 1)
        if stage.is_first:
            inp = StageInput(("rss",), (0,), 0, token_ids=torch.tensor([prompt]))
        else:
            inp = StageInput(("rss",), (0,), 0, hidden=torch.zeros(1, len(prompt), stage.config.hidden_size))
        stage.forward(inp)
    # VmHWM is this process's own peak; ru_maxrss would also count the (large) parent it forked from.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            queue.put(int(line.split()[1]) * 1024)
            return
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_rss(shard_dir: Path | None, index: int, prompt: list[int]) -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_rss, args=(str(shard_dir) if shard_dir else None, index, prompt, queue))
    proc.start()
    value = int(queue.get(timeout=600))
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="HF folder (default: import smollm2-135m)")
    parser.add_argument("--dtypes", default="fp32,bf16,int8,nf4")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--quantized-new-tokens", type=int, default=8, help="for int8/nf4 (slow on CPU)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-rss", action="store_true", help="skip the per-stage RSS children")
    parser.add_argument("--out", type=Path, default=Path("bench/results/pipeline_local.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.load()
    model_dir = args.model_dir or import_model("smollm2-135m", settings.models_dir, settings.home / "cache")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer(PROMPT)["input_ids"]
    results: dict[str, Any] = {
        "model": str(model_dir),
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "dtypes": {},
    }
    baseline_rss = 0 if args.no_rss else peak_rss(None, 0, prompt)
    results["import_only_rss_bytes"] = baseline_rss
    with tempfile.TemporaryDirectory(prefix="dlis-bench-") as tmp:
        for dtype in args.dtypes.split(","):
            n = args.quantized_new_tokens if dtype in ("int8", "nf4") else args.new_tokens
            row: dict[str, Any] = {"new_tokens": n, "hf_generate": bench_hf(model_dir, dtype, prompt, n, args.repeats)}
            for stages in (1, 3):
                shard_dir = Path(tmp) / f"{dtype}-{stages}"
                export_shards(model_dir, shard_dir, stages=stages, dtype=dtype)  # type: ignore[arg-type]
                entry = bench_pipeline(shard_dir, prompt, n, args.repeats)
                hf = row["hf_generate"]
                entry["tokens_per_s_ratio"] = entry["tokens_per_s"] / hf["tokens_per_s"]
                entry["ttft_ratio"] = entry["ttft_s"] / hf["ttft_s"]
                if not args.no_rss:
                    entry["peak_rss_bytes_per_stage"] = [peak_rss(shard_dir, i, prompt) for i in range(stages)]
                    entry["stage_rss_over_imports_bytes"] = [
                        r - baseline_rss for r in entry["peak_rss_bytes_per_stage"]
                    ]
                row[f"pipeline_{stages}_stage"] = entry
            hidden = torch.zeros(1, 1, 576, dtype=compute_dtype(dtype))
            row["hidden_message_bytes_per_token"] = bytes_per_token(StageOutput(("s",), (0,), 0, hidden=hidden))
            results["dtypes"][dtype] = row
            _print_row(dtype, row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a kill
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def _print_row(dtype: str, row: dict[str, Any]) -> None:
    hf = row["hf_generate"]
    print(f"{dtype}: HF generate {hf['tokens_per_s']:.1f} tok/s, TTFT {hf['ttft_s'] * 1e3:.0f} ms")
    for stages in (1, 3):
        e = row[f"pipeline_{stages}_stage"]
        rss = e.get("stage_rss_over_imports_bytes")
        rss_text = f", stage RSS over imports {[round(r / 2**20) for r in rss]} MiB" if rss else ""
        print(
            f"  {stages}-stage: {e['tokens_per_s']:.1f} tok/s (x{e['tokens_per_s_ratio']:.3f}), "
            f"TTFT {e['ttft_s'] * 1e3:.0f} ms (x{e['ttft_ratio']:.3f}){rss_text}"
        )


if __name__ == "__main__":
    main()
