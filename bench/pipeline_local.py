"""Benchmark: HF generate vs the in-process pipeline (1 and 3 stages) for SmolLM2-135M.

For each dtype (fp32, bf16, int8, nf4) it measures greedy decode tokens/s and time to first token
(TTFT) of transformers ``generate`` and of ``LocalPipeline`` with 1 and 3 stages, all in this
process and this run, interleaved round by round (see :func:`bench_interleaved`), and prints them
as ratios to HF generate with the spread of the per-round ratios and the load average. Peak RSS
per stage is measured in a fresh child process per stage (load the stage + one prefill), minus the
RSS of a child that only imports the libraries. Results go to JSON. On a shared machine, compare
with ``--threads 1``: two busy threads on oversubscribed cores stall at every OpenMP barrier.

    .venv/bin/python bench/pipeline_local.py --new-tokens 32 --out bench/results/pipeline_local.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
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


class _HFRunner:
    """One timed greedy ``generate`` of the HF model per call: (TTFT, total) seconds."""

    def __init__(self, model_dir: Path, dtype: str, prompt: list[int]) -> None:
        self.model = _hf_model(model_dir, dtype).eval()
        self.ids = torch.tensor([prompt])
        self.prompt_len = len(prompt)

    def __call__(self, n: int) -> tuple[float, float]:
        timer = _FirstTokenTimer()
        kwargs = {"attention_mask": torch.ones_like(self.ids), "do_sample": False, "pad_token_id": 0}
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(self.ids, max_new_tokens=n, min_new_tokens=n, streamer=timer, **kwargs)
        total = time.perf_counter() - start
        assert out.shape[1] == self.prompt_len + n and timer.first is not None
        return timer.first - start, total


class _PipelineRunner:
    """One timed ``LocalPipeline.generate_ids`` per call: (TTFT, total) seconds."""

    def __init__(self, shard_dir: Path, prompt: list[int]) -> None:
        self.pipe = LocalPipeline.load(shard_dir)
        self.prompt = prompt

    def __call__(self, n: int) -> tuple[float, float]:
        gen = self.pipe.generate_ids([self.prompt], n)[0]
        assert len(gen.token_ids) == n
        return gen.ttft_s, gen.total_s


def _tokens_per_s(n: int, run: tuple[float, float]) -> float:
    return (n - 1) / (run[1] - run[0])


def bench_interleaved(runners: dict[str, Any], new_tokens: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Time every runner ``repeats`` times, interleaved round by round (order rotated each round).

    On a loaded machine the speed of all runners drifts together; a ratio taken within one round
    cancels most of that drift, so each pipeline's ratio to ``hf_generate`` is the median of the
    per-round ratios, and their spread (min..max) says how noisy the figure is. The process CPU
    time of each whole generation (prefill + decode) is recorded too: with one thread it hardly
    depends on the load, so ``cpu_speed_ratio`` (HF's CPU seconds over ours) is the steadier figure.
    """
    names = list(runners)
    for name in names:
        runners[name](2)  # warm-up (also bitsandbytes' one-time weight repacking, where it happens)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            cpu_start = time.process_time()
            runs[name].append(runners[name](new_tokens))
            cpu[name].append(time.process_time() - cpu_start)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        tps = [_tokens_per_s(new_tokens, run) for run in runs[name]]
        out[name] = {
            "ttft_s": statistics.median(run[0] for run in runs[name]),
            "tokens_per_s": statistics.median(tps),
            "tokens_per_s_runs": tps,
            "cpu_s": statistics.median(cpu[name]),
        }
    hf_runs = runs["hf_generate"]
    for name in names:
        if name == "hf_generate":
            continue
        ratios = [
            _tokens_per_s(new_tokens, a) / _tokens_per_s(new_tokens, b)
            for a, b in zip(runs[name], hf_runs, strict=True)
        ]
        ttft_ratios = [a[0] / b[0] for a, b in zip(runs[name], hf_runs, strict=True)]
        out[name]["tokens_per_s_ratio"] = statistics.median(ratios)
        out[name]["tokens_per_s_ratio_range"] = [min(ratios), max(ratios)]
        out[name]["ttft_ratio"] = statistics.median(ttft_ratios)
        cpu_ratios = [b / a for a, b in zip(cpu[name], cpu["hf_generate"], strict=True)]
        out[name]["cpu_speed_ratio"] = statistics.median(cpu_ratios)
        out[name]["cpu_speed_ratio_range"] = [min(cpu_ratios), max(cpu_ratios)]
    return out


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
            row: dict[str, Any] = {"new_tokens": n, "load_average_before": list(os.getloadavg())}
            runners: dict[str, Any] = {"hf_generate": _HFRunner(model_dir, dtype, prompt)}
            shard_dirs: dict[int, Path] = {}
            for stages in (1, 3):
                shard_dirs[stages] = Path(tmp) / f"{dtype}-{stages}"
                export_shards(model_dir, shard_dirs[stages], stages=stages, dtype=dtype)  # type: ignore[arg-type]
                runners[f"pipeline_{stages}_stage"] = _PipelineRunner(shard_dirs[stages], prompt)
            row.update(bench_interleaved(runners, n, args.repeats))
            row["load_average_after"] = list(os.getloadavg())
            del runners
            if not args.no_rss:
                for stages in (1, 3):
                    entry = row[f"pipeline_{stages}_stage"]
                    entry["peak_rss_bytes_per_stage"] = [peak_rss(shard_dirs[stages], i, prompt) for i in range(stages)]
                    entry["stage_rss_over_imports_bytes"] = [
                        r - baseline_rss for r in entry["peak_rss_bytes_per_stage"]
                    ]
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
    load = ", ".join(f"{x:.1f}" for x in row["load_average_before"])
    print(
        f"{dtype}: HF generate {hf['tokens_per_s']:.1f} tok/s, TTFT {hf['ttft_s'] * 1e3:.0f} ms (load average {load})"
    )
    for stages in (1, 3):
        e = row[f"pipeline_{stages}_stage"]
        rss = e.get("stage_rss_over_imports_bytes")
        rss_text = f", stage RSS over imports {[round(r / 2**20) for r in rss]} MiB" if rss else ""
        print(
            f"  {stages}-stage: {e['tokens_per_s']:.1f} tok/s (x{e['tokens_per_s_ratio']:.3f}, rounds "
            f"{e['tokens_per_s_ratio_range'][0]:.3f}..{e['tokens_per_s_ratio_range'][1]:.3f}; CPU time "
            f"x{e['cpu_speed_ratio']:.3f}, rounds {e['cpu_speed_ratio_range'][0]:.3f}.."
            f"{e['cpu_speed_ratio_range'][1]:.3f}), "
            f"TTFT {e['ttft_s'] * 1e3:.0f} ms (x{e['ttft_ratio']:.3f}){rss_text}"
        )


if __name__ == "__main__":
    main()
