"""Benchmark: LoRA adapters applied on the fly by a stage vs the merged model (the baseline) vs the base.

One stage holds all of SmolLM2-135M (fp32 shards). Four LoRA adapters (r=8 on q_proj and v_proj,
trained with PEFT for a few steps on the packaged tiny dataset) are attached to it. Greedy decode of
a batch of 4 sessions is timed, interleaved round by round, for:

- ``merged``: the shards of adapter 0 merged into the weights with PEFT (one model per adapter:
  the baseline a worker without on-the-fly adapters would run);
- ``base``: the base model, no adapter (what the hooks cost when nothing uses them: none installed);
- ``adapter_1``: the base stage with 4 sessions all on adapter 0;
- ``adapter_4_mixed``: 4 sessions on 4 different adapters, in the same batched passes.

Ratios are aggregate decode tokens/s over ``merged``'s, per round, median and range. It also checks
that ``adapter_1`` gives the merged model's tokens, and reports adapter bytes vs model bytes.

    .venv/bin/python bench/lora_adapters.py --new-tokens 24 --out bench/results/lora_adapters.json
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
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from dlis_market.inference.adapter_training import train_tiny_adapter
from dlis_market.inference.adapters import ADAPTER_WEIGHTS
from dlis_market.inference.importer import import_model
from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.shard_export import export_shards
from dlis_market.settings import Settings

PROMPT = "The captain looked at the sea and said"
BATCH = 4


def _model_dir(args: argparse.Namespace, work: Path) -> Path:
    if args.tiny:
        config = LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        )  # fmt: skip
        torch.manual_seed(0)
        path = work / "tiny-llama"
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        return path
    if args.model_dir:
        return Path(args.model_dir)
    settings = Settings.load()
    return import_model("smollm2-135m", settings.models_dir, settings.home / "cache")


def _merged_dir(model_dir: Path, adapter: Path, out: Path) -> Path:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    return out


def _decode_tps(pipe: LocalPipeline, prompt: list[int], n: int, adapters: list[str | None]) -> tuple[float, list[int]]:
    gens = pipe.generate_ids([prompt] * len(adapters), n, adapters=adapters)
    decode_s = max(g.total_s for g in gens) - max(g.ttft_s for g in gens)
    return sum(len(g.token_ids) - 1 for g in gens) / decode_s, gens[0].token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="HF folder (default: import smollm2-135m)")
    parser.add_argument("--tiny", action="store_true", help="a random 4-layer Llama instead of SmolLM2")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results/lora_adapters.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dlis-lora-bench-") as tmp:
        work = Path(tmp)
        model_dir = _model_dir(args, work)
        adapters = [work / f"adapter{i}" for i in range(BATCH)]  # r=8 on q, v: the common LoRA recipe
        for i, path in enumerate(adapters):
            train_tiny_adapter(model_dir, path, r=8, alpha=16, steps=args.train_steps, seed=i, block=32, batch=2)
        export_shards(model_dir, work / "base", stages=1, dtype="fp32", name="base")
        export_shards(_merged_dir(model_dir, adapters[0], work / "merged-hf"), work / "merged", stages=1, dtype="fp32")
        base, merged = LocalPipeline.load(work / "base"), LocalPipeline.load(work / "merged")
        ids = [base.attach_adapter(path) for path in adapters]
        try:
            prompt = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
        except (OSError, ValueError):  # the random tiny model has no tokenizer
            prompt = [ord(c) % 512 for c in PROMPT]
        runners: dict[str, Any] = {
            "merged": lambda: _decode_tps(merged, prompt, args.new_tokens, [None] * BATCH),
            "base": lambda: _decode_tps(base, prompt, args.new_tokens, [None] * BATCH),
            "adapter_1": lambda: _decode_tps(base, prompt, args.new_tokens, [ids[0]] * BATCH),
            "adapter_4_mixed": lambda: _decode_tps(base, prompt, args.new_tokens, list(ids)),
        }
        for run in runners.values():
            run()  # warm-up
        rounds: dict[str, list[float]] = {name: [] for name in runners}
        cpu: dict[str, list[float]] = {name: [] for name in runners}
        tokens: dict[str, list[int]] = {}
        names = list(runners)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                cpu_start = time.process_time()
                tps, tokens[name] = runners[name]()
                cpu[name].append(time.process_time() - cpu_start)
                rounds[name].append(tps)
        model_bytes = sum(s.resident_bytes() for s in base.stages)
        adapter_file_bytes = (adapters[0] / ADAPTER_WEIGHTS).stat().st_size
        adapter_resident = base.stages[0].adapters.nbytes() // len(ids)
    results: dict[str, Any] = {}
    for name, tps in rounds.items():
        ratios = [a / b for a, b in zip(tps, rounds["merged"], strict=True)]
        cpu_ratios = [b / a for a, b in zip(cpu[name], cpu["merged"], strict=True)]
        results[name] = {
            "decode_tokens_per_s": statistics.median(tps),
            "decode_tokens_per_s_runs": tps,
            "ratio_to_merged": statistics.median(ratios),
            "ratio_to_merged_range": [min(ratios), max(ratios)],
            # process CPU seconds of the whole generation, merged's over this one's: with one thread
            # it hardly moves with the machine's load, the steadier figure on a shared machine
            "cpu_speed_ratio_to_merged": statistics.median(cpu_ratios),
            "cpu_speed_ratio_range": [min(cpu_ratios), max(cpu_ratios)],
        }
    out = {
        "model": "tiny-llama" if args.tiny else str(model_dir.name),
        "dtype": "fp32",
        "batch_sessions": BATCH,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "adapter": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "train_steps": args.train_steps},
        "results": results,
        "adapter_1_tokens_equal_merged": tokens["adapter_1"] == tokens["merged"],
        "adapter_tokens_differ_from_base": tokens["adapter_1"] != tokens["base"],
        "adapter_file_bytes": adapter_file_bytes,
        "adapter_resident_bytes": adapter_resident,
        "model_resident_bytes": model_bytes,
        "adapter_to_model_bytes": adapter_file_bytes / model_bytes,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "cpu_count": os.cpu_count(),
        "machine": machine_info(),
        "wall_s": time.perf_counter() - started,
    }
    print(f"{'config':<18}{'decode tok/s':>14}{'x merged':>10}  {'range':<13}{'cpu x merged':>13}  range")
    for name, row in results.items():
        lo, hi = row["ratio_to_merged_range"]
        clo, chi = row["cpu_speed_ratio_range"]
        print(
            f"{name:<18}{row['decode_tokens_per_s']:>14.1f}{row['ratio_to_merged']:>10.3f}  {lo:.3f}..{hi:.3f}  "
            f"{row['cpu_speed_ratio_to_merged']:>12.3f}  {clo:.3f}..{chi:.3f}"
        )
    print(
        f"adapter {adapter_file_bytes / 2**20:.2f} MiB on disk vs model {model_bytes / 2**20:.1f} MiB "
        f"({out['adapter_to_model_bytes']:.2%}); adapter_1 tokens == merged: {out['adapter_1_tokens_equal_merged']}; "
        f"loadavg {' '.join(out['loadavg'])}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
