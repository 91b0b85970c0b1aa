"""GPU stages: tokens/s of a 3-stage in-process pipeline vs HF generate on one device, and exactness.

    .venv/bin/python bench/gpu_stage.py --quick     # here: CPU (1 thread), under 2 minutes
    .venv/bin/python bench/gpu_stage.py pack        # here, before a GPU run: what that machine lacks
    python3 bench/gpu_stage.py                      # there, as GPU_COMMAND below says (full mode)

For each dtype (fp32, bf16, int8, nf4; fp16 is not a shard dtype, so its row says why it is
skipped) it measures greedy decode of HF ``generate`` and of ``LocalPipeline`` with 3 stages,
both on ``--device`` (auto: cuda where torch sees one) in the same dtype, at batch 1 and 8,
interleaved round by round (the ratio of each round, then the median: the steadier figure), and
the exactness of every stage on the device: the worst token's relative L2
(``dlis_market.protocol.outputs.compare_outputs``) of its outputs against the same stage on the
CPU in the same dtype (what a spot check compares; tolerance from ``TOLERANCES``) and against
the stage in CPU fp32 (how far the dtype itself is; the tolerance is not made for that pair and
int8 / nf4 are expected to exceed it). Every stage gets the inputs the CPU fp32 pipeline gave
it (a teacher-forced replay, as a spot check replays a transcript); the last stage's output is
its logits (and whether their argmax, the greedy token, agrees). int8 / nf4 run bitsandbytes'
CUDA kernels and are skipped on the CPU (``bench/pipeline_local.py`` measures them there; HF's
int8 uses ``llm_int8_threshold=0``, the stages' arithmetic). Prints one JSON document and writes
``bench/results/gpu_stage.json``.

Weights: ``--weights auto`` takes SmolLM2-135M-Instruct where it is already imported (the tests'
cache, as ``bench/gpu_tolerance.py`` finds it) and otherwise random weights of SmolLM2-135M's
shape (the CUDA machine: the model is 517 MiB in fp32, over the 64 MiB that travels there, and
it cannot download): the same layers, so the same speed, and the exactness of the same kernels
on other values. ``--weights smollm2`` imports it (downloads here), ``--model-dir`` takes any HF
folder. ``--budget-s`` (270 s full, 110 s quick) skips the dtypes that would not fit, saying so.

The CUDA machine (Python 3.12, torch 2.11+cu130, transformers 5.17) lacks bitsandbytes,
pydantic, zstandard and eth-utils, which ``dlis_market`` imports: ``pack`` copies the pure-Python
ones and bitsandbytes (its CPU and CUDA 13.0 libraries only) from this .venv and fetches CPython
3.12 wheels of the two compiled ones (pydantic-core, zstandard) into
``bench/results/gpu-stage-pack/site``, plus this .venv's transformers as a wheel (the stages use
its cache and mask internals; unpacked it is over the size that travels), 36 MiB in all, ignored
by git. Run :data:`GPU_COMMAND` there with ``carry: ["bench/results/gpu-stage-pack"]``; if the
transformers install fails, drop ``/tmp/tf:`` to run on the machine's own. Full mode is sized to
end within ``--budget-s`` 270 s of compute after its imports.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # the CUDA machine runs the checkout, not an install

import torch  # noqa: E402
from machine_info import machine_info  # type: ignore[import-not-found]  # noqa: E402

DTYPES = ("fp32", "bf16", "fp16", "int8", "nf4")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "A haiku about autumn: leaves fall slowly to the ground, and the wind",
    "To bake bread you need flour, water, salt and yeast. First you mix",
    "Python is a programming language that lets you write programs which",
    "The three primary colors are red, yellow and blue. When you mix them",
    "In machine learning, a transformer is a neural network architecture that",
    "Once upon a time, a robot who wanted to paint walked into a small shop",
    "The ocean covers most of the Earth's surface, and its deepest point is",
]
SMOLLM2_SHAPE: dict[str, Any] = {  # SmolLM2-135M-Instruct's config.json, for --weights random
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
PACK_DIR = ROOT / "bench" / "results" / "gpu-stage-pack"
PURE_PACKAGES = ("pydantic", "annotated_types", "typing_inspection", "eth_hash", "eth_typing", "eth_utils")
PURE_MODULES = ("typing_extensions.py",)  # pydantic 2.13 needs a recent one
GPU_COMMAND = (
    "P=bench/results/gpu-stage-pack; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/tf "
    "$P/wheels/transformers-*.whl && PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/tf:$P/site "
    "python3 bench/gpu_stage.py --out $OUT/gpu_stage.json"
)
COMPILED_PACKAGES = ("pydantic_core", "zstandard")


# ---------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _FirstTokenTimer:
    """A generate streamer noting when the first new token is there (the prompt comes first)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.calls = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            _sync(self.device)
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class HFRunner:
    """Greedy ``generate`` of the HF model on the device: (TTFT, total) seconds per call."""

    def __init__(self, model_dir: Path, dtype: str, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        self.device = device
        model: Any
        if dtype in TORCH_DTYPES:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=TORCH_DTYPES[dtype])
            model = model.to(device)
        else:
            quant = (
                BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
                if dtype == "int8"
                else BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
                )
            )
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map={"": device}
            )
        self.model = model.eval()
        self.model.generation_config.eos_token_id = None  # every run decodes all its tokens

    def __call__(self, prompts: list[list[int]], n: int) -> tuple[float, float]:
        ids = torch.tensor(prompts, device=self.device)
        timer = _FirstTokenTimer(self.device)
        _sync(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                streamer=timer,
            )
        _sync(self.device)
        total = time.perf_counter() - start
        if out.shape[1] != ids.shape[1] + n or timer.first is None:
            raise RuntimeError(f"HF generate returned {out.shape[1] - ids.shape[1]} tokens, not {n}")
        return timer.first - start, total


class PipelineRunner:
    """``LocalPipeline.generate_ids`` (greedy) over 3 stages on the device: (TTFT, total) seconds."""

    def __init__(self, shard_dir: Path, device: torch.device) -> None:
        from dlis_market.inference.pipeline import LocalPipeline

        self.pipe = LocalPipeline.load(shard_dir, device=device)

    def __call__(self, prompts: list[list[int]], n: int) -> tuple[float, float]:
        gens = self.pipe.generate_ids(prompts, n)  # tokens come back to the CPU each step: timed in full
        if any(len(g.token_ids) != n for g in gens):
            raise RuntimeError(f"the pipeline returned {[len(g.token_ids) for g in gens]} tokens, not {n}")
        return gens[0].ttft_s, max(g.total_s for g in gens)


def bench_pair(runners: dict[str, Any], prompts: list[list[int]], n: int, repeats: int) -> dict[str, Any]:
    """Time both runners ``repeats`` times, alternating which goes first; decode tokens/s (all
    sessions together) and TTFT, and the pipeline's ratio to HF per round (median, min..max).
    On a CPU the ratio of process CPU seconds per run (HF's over the pipeline's) is recorded too:
    on a shared machine it moves less with the load than wall-clock time does."""
    for run in runners.values():
        run(prompts, 2)  # warm-up: kernels, allocator, bitsandbytes' first-call work
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    cpu_s: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(repeats):
        for name in names[r % 2 :] + names[: r % 2]:
            cpu_start = time.process_time()
            runs[name].append(runners[name](prompts, n))
            cpu_s[name].append(time.process_time() - cpu_start)
    batch = len(prompts)

    def tps(run: tuple[float, float]) -> float:
        return batch * (n - 1) / max(run[1] - run[0], 1e-9)

    out: dict[str, Any] = {}
    for name, timed in runs.items():
        out[name] = {
            "tokens_per_s": statistics.median(tps(t) for t in timed),
            "tokens_per_s_runs": [round(tps(t), 2) for t in timed],
            "ttft_s": statistics.median(t[0] for t in timed),
            "process_cpu_s": statistics.median(cpu_s[name]),
        }
    ratios = [tps(p) / tps(h) for p, h in zip(runs["pipeline_3_stage"], runs["hf_generate"], strict=True)]
    out["pipeline_vs_hf"] = statistics.median(ratios)
    out["pipeline_vs_hf_range"] = [min(ratios), max(ratios)]
    cpu_ratios = [h / p for p, h in zip(cpu_s["pipeline_3_stage"], cpu_s["hf_generate"], strict=True)]
    out["pipeline_vs_hf_cpu_time"] = statistics.median(cpu_ratios)
    return out


# ------------------------------------------------------------------------------------ exactness


def record_reference(stages: list[Any], prompt: list[int], steps: int) -> list[list[Any]]:
    """Each stage's inputs in a greedy CPU run (prefill + ``steps`` decode steps), per stage."""
    from dlis_market.inference.messages import StageInput

    inputs: list[list[Any]] = [[] for _ in stages]
    sid, pos, ids = "ref", 0, torch.tensor([prompt])
    for stage in stages:
        stage.open_session(sid, len(prompt) + steps + 1)
    try:
        for step in range(steps + 1):
            inp = StageInput((sid,), (pos,), step, token_ids=ids, want_logits=True)
            for i, stage in enumerate(stages):
                inputs[i].append(inp)
                out = stage.forward(inp)
                if out.hidden is not None:
                    inp = StageInput((sid,), (pos,), step, hidden=out.hidden, want_logits=True)
            assert out.token_ids is not None
            pos += ids.shape[1]
            ids = out.token_ids.view(1, 1)
    finally:
        for stage in stages:
            stage.close_session(sid)
    return inputs


def replay(stage: Any, inputs: list[Any]) -> torch.Tensor:
    """The stage's outputs for ``inputs`` in order (hidden states, or the last stage's logits),
    concatenated over tokens as float32 ``[tokens, width]`` on the CPU."""
    sid = inputs[0].session_ids[0]
    total = sum(inp.num_tokens for inp in inputs)
    stage.open_session(sid, total + 1)
    rows = []
    try:
        for inp in inputs:
            out = stage.forward(inp)
            if out.hidden is not None:
                rows.append(out.hidden[0].float())
            else:
                assert out.logits is not None
                rows.append(out.logits.float())
    finally:
        stage.close_session(sid)
    return torch.cat(rows)


def exactness(
    shard_dirs: dict[str, Path],
    dtype: str,
    device: torch.device,
    reference: list[list[list[Any]]],
    fp32_outputs: dict[tuple[int, int], torch.Tensor],
) -> dict[str, Any]:
    """Per stage: device ``dtype`` vs CPU ``dtype`` (the spot check's pair) and vs CPU fp32
    (whose replays ``fp32_outputs`` keeps across dtypes, by stage and prompt)."""
    from dlis_market.inference.stage import Stage
    from dlis_market.protocol.outputs import TOLERANCES, compare_outputs

    tol = TOLERANCES[dtype].max_rel_diff
    stages = []
    for index in range(3):
        cpu_fp32 = None
        cpu = Stage.load(shard_dirs[dtype], index=index)
        dev = cpu if device.type == "cpu" else Stage.load(shard_dirs[dtype], index=index, device=device)
        worst_same, worst_fp32, agree, total = 0.0, 0.0, 0, 0
        for k, per_prompt in enumerate(reference):
            inputs = per_prompt[index]
            if (index, k) not in fp32_outputs:
                cpu_fp32 = cpu_fp32 or Stage.load(shard_dirs["fp32"], index=index)
                fp32_outputs[index, k] = replay(cpu_fp32, inputs)
            a, b, c = replay(dev, inputs), replay(cpu, inputs), fp32_outputs[index, k]
            width = a.shape[-1]
            worst_same = max(worst_same, compare_outputs(a.numpy(), b.numpy(), dtype, width).rel_diff)
            worst_fp32 = max(worst_fp32, compare_outputs(a.numpy(), c.numpy(), dtype, width).rel_diff)
            if cpu.is_last:
                agree += int((a.argmax(-1) == c.argmax(-1)).sum())
                total += a.shape[0]
        row: dict[str, Any] = {
            "layers": str(cpu.layers),
            "output": "logits" if cpu.is_last else "hidden",
            "rel_l2_vs_cpu_same_dtype": worst_same,
            "within_tolerance_vs_cpu_same_dtype": worst_same <= tol,
            "rel_l2_vs_cpu_fp32": worst_fp32,
            "within_tolerance_vs_cpu_fp32": worst_fp32 <= tol,
        }
        if cpu.is_last:
            row["greedy_token_agreement_vs_cpu_fp32"] = agree / max(total, 1)
        stages.append(row)
    return {"tolerance": tol, "stages": stages}


# ---------------------------------------------------------------------------------------- setup


def model_source(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """(HF folder, what its weights are) following ``--model-dir`` / ``--weights``."""
    from dlis_market.inference.importer import import_model

    if args.model_dir is not None:
        return args.model_dir, f"HF folder {args.model_dir}"
    cache = Path(tempfile.gettempdir()) / "dlis-test-cache" / "v1"
    imported = cache / "models" / "smollm2-135m"
    if args.weights == "smollm2" or (args.weights == "auto" and (imported / "config.json").is_file()):
        return import_model("smollm2-135m", cache / "models", cache / "cache"), "SmolLM2-135M-Instruct"
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2_SHAPE), dtype=torch.float32)
    out = workdir / "random-smollm2-shape"
    model.save_pretrained(out)
    return out, "random (seed 0, HF init), SmolLM2-135M shape"


def prompt_ids(model_dir: Path, vocab: int, batch: int, length: int) -> list[list[int]]:
    """``batch`` prompts of ``length`` tokens: the text prompts through the model's tokenizer
    (cut to one length: a batch of HF generate without padding), else seeded random ids."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = [tok(p)["input_ids"] for p in PROMPTS]
    except (OSError, ValueError):  # a folder without a tokenizer (random weights): ids will do
        gen = torch.Generator().manual_seed(0)
        ids = [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in PROMPTS]
    length = min(length, *(len(i) for i in ids))
    return [i[:length] for i in (ids * batch)[:batch]]


def skip_reason(dtype: str, device: torch.device) -> str | None:
    if dtype == "fp16":
        return (
            "fp16 is not a shard dtype (manifests hold fp32, bf16, int8 or nf4; the spot-check tolerances and "
            "on-chain dtypes have no fp16 either): adding it is a change to export, manifest and protocol"
        )
    if dtype in ("int8", "nf4") and device.type != "cuda":
        return f"{dtype} rows run bitsandbytes' CUDA kernels; on the CPU they are measured by bench/pipeline_local.py"
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dlis_market.inference.shard_export import export_shards
    from dlis_market.inference.stage import resolve_device

    began = time.perf_counter()
    device = resolve_device(args.device)
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    quick = args.quick
    new_tokens = args.new_tokens or (16 if quick else 64)
    repeats = args.repeats or 3
    budget = args.budget_s or (110.0 if quick else 270.0)
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "bf16", "fp16"] if quick else list(DTYPES))
    result: dict[str, Any] = {
        "bench": "gpu_stage",
        "mode": "quick" if quick else "full",
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "versions": {p: _version(p) for p in ("transformers", "bitsandbytes")},
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "budget_s": budget,
        "load_average_before": list(os.getloadavg()),
        "dtypes": {},
    }
    with tempfile.TemporaryDirectory(prefix="dlis-gpu-stage-") as tmp:
        workdir = Path(tmp)
        model_dir, weights = model_source(args, workdir)
        from transformers import AutoConfig

        vocab = int(AutoConfig.from_pretrained(model_dir).vocab_size)
        batches = {b: prompt_ids(model_dir, vocab, b, args.prompt_tokens) for b in (1, 8)}
        result.update(weights=weights, model_dir=str(model_dir), prompt_tokens=len(batches[1][0]))
        result["setup_s"] = time.perf_counter() - began
        shard_dirs: dict[str, Path] = {}

        def shards(dtype: str) -> Path:
            if dtype not in shard_dirs:
                shard_dirs[dtype] = workdir / f"shards-{dtype}"
                export_shards(model_dir, shard_dirs[dtype], stages=3, dtype=dtype)  # type: ignore[arg-type]
            return shard_dirs[dtype]

        from dlis_market.inference.stage import Stage

        t = time.perf_counter()
        reference_stages = [Stage.load(shards("fp32"), index=i) for i in range(3)]
        exact_prompts = batches[8][: 1 if quick else 3]
        steps = args.exact_steps or (2 if quick else 6)
        reference = [record_reference(reference_stages, p, steps) for p in exact_prompts]
        del reference_stages
        result["reference_s"] = time.perf_counter() - t
        row_s: list[float] = []
        fp32_outputs: dict[tuple[int, int], torch.Tensor] = {}
        for dtype in dtypes:
            reason = skip_reason(dtype, device)
            spent = time.perf_counter() - began
            if reason is None and row_s and spent + max(row_s) > budget:
                reason = f"time budget: {spent:.0f} s spent, a row took up to {max(row_s):.0f} s, budget {budget:.0f} s"
            if reason is not None:
                result["dtypes"][dtype] = {"skipped": reason}
                continue
            t = time.perf_counter()
            row: dict[str, Any] = {"load_average_before": list(os.getloadavg())}
            runners: dict[str, Any] = {"hf_generate": HFRunner(model_dir, dtype, device)}
            runners["pipeline_3_stage"] = PipelineRunner(shards(dtype), device)
            for batch, prompts in batches.items():
                row[f"batch_{batch}"] = bench_pair(runners, prompts, new_tokens, repeats)
                if device.type == "cuda":
                    row[f"batch_{batch}"]["max_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
            del runners
            if device.type == "cuda":
                torch.cuda.empty_cache()
            dirs = {"fp32": shards("fp32"), dtype: shards(dtype)}
            row["exactness"] = exactness(dirs, dtype, device, reference, fp32_outputs)
            row["seconds"] = time.perf_counter() - t
            row_s.append(row["seconds"])
            result["dtypes"][dtype] = row
            _print_row(dtype, row)
    result["load_average_after"] = list(os.getloadavg())
    result["elapsed_s"] = time.perf_counter() - began
    return result


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _print_row(dtype: str, row: dict[str, Any]) -> None:
    parts = []
    for batch in (1, 8):
        b = row[f"batch_{batch}"]
        parts.append(
            f"batch {batch}: HF {b['hf_generate']['tokens_per_s']:.1f} tok/s, "
            f"pipeline {b['pipeline_3_stage']['tokens_per_s']:.1f} (x{b['pipeline_vs_hf']:.2f})"
        )
    worst = max(s["rel_l2_vs_cpu_same_dtype"] for s in row["exactness"]["stages"][:-1])
    print(f"# {dtype}: {'; '.join(parts)}; worst hidden rel L2 vs CPU {worst:.2e} ({row['seconds']:.0f} s)",
          file=sys.stderr)  # fmt: skip


# ----------------------------------------------------------------------------------------- pack


def pack(out: Path) -> None:
    """Put what the CUDA machine's Python 3.12 lacks under ``out/site`` (see the module doc)."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    target = out / "site"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in PURE_PACKAGES:
        shutil.copytree(site / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in PURE_MODULES:
        shutil.copy2(site / name, target / name)
    keep = {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"}  # the CUDA machine's torch: cu130
    shutil.copytree(
        site / "bitsandbytes",
        target / "bitsandbytes",
        ignore=lambda _d, names: [n for n in names if n == "__pycache__" or (n.endswith(".so") and n not in keep)],
    )
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = [
        f"{name.replace('_', '-')}=={importlib.metadata.version(name.replace('_', '-'))}" for name in COMPILED_PACKAGES
    ]
    platforms = [f"--platform={p}" for p in ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64")]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *platforms, "-d", str(wheels), *pins],
        check=True,
    )  # fmt: skip
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
    for unused in target.glob("zstandard/_cffi.*.so"):  # its C backend is the one it loads
        unused.unlink()
    for wheel in wheels.glob("*.whl"):
        wheel.unlink()  # unpacked
    # transformers as here (the CUDA machine's is older; the stages use its cache and mask
    # internals): 129 MiB unpacked, so it travels as its wheel and is installed there.
    version = importlib.metadata.version("transformers")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
         f"transformers=={version}"],
        check=True,
    )  # fmt: skip
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB); on the CUDA machine, carrying it:\n{GPU_COMMAND}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", nargs="?", choices=["run", "pack"], default="run")
    ap.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="fp32/bf16, 16 tokens, 1 thread: under 2 minutes on a CPU")
    ap.add_argument("--dtypes", default=None, help=f"comma-separated subset of {','.join(DTYPES)}")
    ap.add_argument("--weights", choices=["auto", "smollm2", "random"], default="auto")
    ap.add_argument("--model-dir", type=Path, default=None, help="an HF folder instead of --weights")
    ap.add_argument("--new-tokens", type=int, default=None, help="decoded per run (64; quick 16)")
    ap.add_argument("--prompt-tokens", type=int, default=12)
    ap.add_argument("--exact-steps", type=int, default=None, help="decode steps replayed per prompt (6; quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (quick on a CPU: 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds, interleaved (3)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip dtypes past this many seconds (270; quick 110)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_stage.json")
    args = ap.parse_args()
    if args.command == "pack":
        pack(PACK_DIR)
        return
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
