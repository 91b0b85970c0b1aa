"""How far two honest runs of the same SmolLM2 stage differ on CPU and on a GPU: the spot-check tolerances.

    .venv/bin/python bench/gpu_tolerance.py prepare --out .gpu      # here (CPU): data + CPU runs
    python3 bench/gpu_tolerance.py measure --data .gpu --out DIR    # on a CUDA machine
    .venv/bin/python bench/gpu_tolerance.py fingerprints --data .gpu --gpu DIR   # here, after

``prepare`` takes SmolLM2-135M's real layers [10, 16) (bf16, as a bf16 shard holds them), the
hidden states entering layer 10 for 6 real prompts (fp32 run of layers [0, 10)), and runs the six
layers on CPU: bf16 alone on 1 thread, bf16 batched with the other prompts on 2 threads, fp32
alone, and int8 / nf4 (bitsandbytes) alone. ``measure`` runs the same on CUDA (alone, batched,
fp32 with and without TF32, int8 and nf4) and compares every pair with the spot check's own
measure, the worst token's ``||a_t - b_t|| / max(||a_t||, ||b_t||)``
(``dlis_market.protocol.outputs.compare_outputs``, restated here because the CUDA machine has
only torch and transformers), next to two measures that were tried and dropped: the largest
difference over the largest value anywhere (SmolLM2's few huge activations hide real errors under
it) and the share of elements off by more than four bf16 ulps (honest CPU vs GPU bf16 runs
already differ in 16 % of elements). Honest pairs must sit below the dtype's tolerance, cheating
pairs (a cheaper quantization passed off as the claimed one) above it. Layers run as a
``LlamaModel`` without its final norm: the same HF layer code a stage runs, prefill of the whole
prompt. int8 / nf4 are quantized from the bf16 weights on the device that runs them. The
bitsandbytes package travels to the CUDA machine in ``.gpu/site`` (copied from this .venv).

``measure`` also writes every run's output rows (``gpu_runs.pt``); ``fingerprints`` (here, with
the project) judges the same pairs with the activation fingerprints of ``protocol/fingerprints.py``:
the fingerprint a worker on one device commits to (its rows) against the rows a checker on the
other recomputes, under the claimed dtype's thresholds (``protocol/fingerprint_thresholds.py``).
An honest pair rejected is a false accusation; a cheating pair accepted is a miss. (Both sides are
prefills of the same prompts here, not a decode against a prefill as in the market.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaModel

FIRST, LAST = 10, 16
PROMPTS = [
    "The capital of France is",
    "A haiku about autumn: leaves",
    "To bake bread you need flour, water",
    "Python is a programming language that",
    "The three primary colors are red,",
    "In machine learning, a transformer is a",
]
TOLERANCE = {"fp32": 2e-3, "bf16": 4e-2, "int8": 0.12, "nf4": 0.1}  # protocol/outputs.py TOLERANCES


PAIRS: dict[str, tuple[str, str, str]] = {  # label -> (claimed dtype, run A, run B)
    "bf16 honest: cpu alone vs cpu batched": ("bf16", "cpu_bf16_alone_t1", "cpu_bf16_batched_t2"),
    "bf16 honest: cpu vs gpu": ("bf16", "cpu_bf16_alone_t1", "gpu_bf16_alone"),
    "bf16 honest: gpu alone vs gpu batched": ("bf16", "gpu_bf16_alone", "gpu_bf16_batched"),
    "bf16 honest: cpu batched vs gpu batched": ("bf16", "cpu_bf16_batched_t2", "gpu_bf16_batched"),
    "fp32 honest: cpu vs gpu": ("fp32", "cpu_fp32_alone_t1", "gpu_fp32_alone"),
    "fp32 honest: gpu alone vs gpu batched": ("fp32", "gpu_fp32_alone", "gpu_fp32_batched"),
    "fp32 honest?: cpu vs gpu with TF32": ("fp32", "cpu_fp32_alone_t1", "gpu_fp32_tf32_alone"),
    "fp32 cheat: bf16 on gpu passed as fp32": ("fp32", "cpu_fp32_alone_t1", "gpu_bf16_alone"),
    "fp32 cheat: bf16 on cpu passed as fp32": ("fp32", "cpu_fp32_alone_t1", "cpu_bf16_alone_t1"),
    "int8 honest: cpu vs gpu": ("int8", "cpu_int8_alone_t1", "gpu_int8_alone"),
    "int8 honest: gpu alone vs gpu batched": ("int8", "gpu_int8_alone", "gpu_int8_batched"),
    "nf4 honest: cpu vs gpu": ("nf4", "cpu_nf4_alone_t1", "gpu_nf4_alone"),
    "nf4 honest: gpu alone vs gpu batched": ("nf4", "gpu_nf4_alone", "gpu_nf4_batched"),
    "bf16 cheat: int8 on gpu passed as bf16": ("bf16", "cpu_bf16_alone_t1", "gpu_int8_alone"),
    "bf16 cheat: nf4 on gpu passed as bf16": ("bf16", "cpu_bf16_alone_t1", "gpu_nf4_alone"),
    "int8 cheat: nf4 on gpu passed as int8": ("int8", "cpu_int8_alone_t1", "gpu_nf4_alone"),
}


def max_abs_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The first measure: largest difference over the largest value anywhere (outliers hide errors)."""
    a, b = a.double().flatten(), b.double().flatten()
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-6)
    return float((a - b).abs().max()) / scale


def quantized(model: LlamaModel, quant: str, device: str) -> LlamaModel:
    """The layers' linears as bitsandbytes int8 (row-wise, threshold 0) or nf4 (blocksize 64),
    quantized from the bf16 weights on ``device``, as ``dlis_market/inference/quantization.py`` does."""
    import bitsandbytes as bnb

    for name, lin in [(n, m) for n, m in model.layers.named_modules() if type(m) is torch.nn.Linear]:
        weight = lin.weight.data.detach().cpu()
        new: torch.nn.Module
        if quant == "int8":
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False,
                                      threshold=0.0)  # fmt: skip
            new.weight = bnb.nn.Int8Params(weight.float().clone(), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                    quant_type="nf4")  # fmt: skip
            new.weight = bnb.nn.Params4bit(weight.to(torch.bfloat16).clone(), requires_grad=False, quant_type="nf4",
                                           blocksize=64)  # fmt: skip
        parent, _, attr = name.rpartition(".")
        setattr(model.layers.get_submodule(parent), attr, new)
    return model.to(device)  # moving bitsandbytes parameters to a device quantizes them there


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The spot check's measure: the worst token's ||a_t - b_t|| / max(||a_t||, ||b_t||)."""
    a, b = a.double(), b.double()
    return float(((a - b).norm(dim=-1) / torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-6)).max())


def far_share(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of elements off by more than 4 bf16 ulps (2**-6 relative) plus 1e-3 of the row RMS."""
    a, b = a.double(), b.double()
    rms = a.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return float(((a - b).abs() > 2**-6 * a.abs() + 1e-3 * rms).double().mean())


def stack(data: Path, dtype: torch.dtype, device: str, quant: str | None = None) -> LlamaModel:
    config = LlamaConfig.from_pretrained(data)
    model = LlamaModel(config)
    model.norm = torch.nn.Identity()  # type: ignore[assignment]  # a middle stage outputs pre-norm states
    state = torch.load(data / "layers.pt", weights_only=True)
    model.layers.load_state_dict(state, strict=True)
    if quant is not None:
        return quantized(model.to(dtype=dtype), quant, device).eval()
    return model.to(device=device, dtype=dtype).eval()


def run(model: LlamaModel, inputs: list[torch.Tensor], target: int, batched: bool, dtype: torch.dtype) -> torch.Tensor:
    """Output rows of prompt ``target`` alone, or batched with all prompts (same length: a stage
    batches only sessions at the same position)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        x = torch.stack(inputs) if batched else inputs[target].unsqueeze(0)
        out = model(inputs_embeds=x.to(device, dtype)).last_hidden_state
        return out[target if batched else 0].float().cpu()


def prepare(out: Path, first: int = FIRST, last: int = LAST) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlis_market.inference.importer import import_model

    cache = Path(tempfile.gettempdir()) / "dlis-test-cache" / "v1"
    model_dir = import_model("smollm2-135m", cache / "models", cache / "cache")
    tok = AutoTokenizer.from_pretrained(model_dir)
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out.mkdir(parents=True, exist_ok=True)
    inputs = []
    encoded = [tok(p)["input_ids"] for p in PROMPTS]
    length = min(len(e) for e in encoded)
    with torch.no_grad():
        for e in encoded:
            ids = torch.tensor([e[:length]])
            hs = full(input_ids=ids, output_hidden_states=True).hidden_states
            inputs.append(hs[first][0].clone())  # entering layer `first`
    torch.save(inputs, out / "inputs.pt")
    layers = {k: v.to(torch.bfloat16).clone() for k, v in full.model.layers[first:last].state_dict().items()}
    torch.save(layers, out / "layers.pt")
    (out / "layers.json").write_text(json.dumps([first, last]))
    cfg = full.config.to_dict()
    cfg.update(num_hidden_layers=last - first, vocab_size=8, tie_word_embeddings=False)
    LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)}).save_pretrained(out)
    cpu: dict[str, list[torch.Tensor]] = {}
    for name, dtype, threads, batched, quant in (
        ("cpu_bf16_alone_t1", torch.bfloat16, 1, False, None),
        ("cpu_bf16_batched_t2", torch.bfloat16, 2, True, None),
        ("cpu_fp32_alone_t1", torch.float32, 1, False, None),
        ("cpu_int8_alone_t1", torch.bfloat16, 1, False, "int8"),
        ("cpu_nf4_alone_t1", torch.bfloat16, 1, False, "nf4"),
    ):
        torch.set_num_threads(threads)
        model = stack(out, dtype, "cpu", quant)
        cpu[name] = [run(model, inputs, i, batched, dtype) for i in range(len(inputs))]
    torch.save(cpu, out / "cpu_runs.pt")
    print(f"wrote {out}: {sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MiB")


def measure(data: Path, out: Path | None, device: str = "cuda") -> dict[str, Any]:
    inputs = torch.load(data / "inputs.pt", weights_only=True)
    runs: dict[str, list[torch.Tensor]] = torch.load(data / "cpu_runs.pt", weights_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for name, dtype, batched, quant in (
        ("gpu_bf16_alone", torch.bfloat16, False, None),
        ("gpu_bf16_batched", torch.bfloat16, True, None),
        ("gpu_fp32_alone", torch.float32, False, None),
        ("gpu_fp32_batched", torch.float32, True, None),
        ("gpu_int8_alone", torch.bfloat16, False, "int8"),
        ("gpu_int8_batched", torch.bfloat16, True, "int8"),
        ("gpu_nf4_alone", torch.bfloat16, False, "nf4"),
        ("gpu_nf4_batched", torch.bfloat16, True, "nf4"),
    ):
        model = stack(data, dtype, device, quant)
        runs[name] = [run(model, inputs, i, batched, dtype) for i in range(len(inputs))]
    torch.backends.cuda.matmul.allow_tf32 = True
    model = stack(data, torch.float32, device)
    runs["gpu_fp32_tf32_alone"] = [run(model, inputs, i, False, torch.float32) for i in range(len(inputs))]
    pairs = PAIRS
    table = {}
    for label, (dtype, a, b) in pairs.items():
        both = list(zip(runs[a], runs[b], strict=True))
        table[label] = {
            "dtype": dtype,
            "rel_diff": max(rel_diff(x, y) for x, y in both),
            "tolerance": TOLERANCE[dtype],
            "max_abs_rel": max(max_abs_rel(x, y) for x, y in both),
            "far_share": max(far_share(x, y) for x, y in both),
        }
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)"
    result = {"device": name, "torch": torch.__version__, "layers": json.loads((data / "layers.json").read_text()),
              "prompts": len(inputs), "pairs": table}  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_tolerance.json").write_text(text + "\n")
        torch.save({k: v for k, v in runs.items() if not k.startswith("cpu_")}, out / "gpu_runs.pt")
    return result


def fingerprints(data: Path, gpu: Path, out: Path | None) -> dict[str, Any]:
    """The pairs of ``measure`` judged by activation fingerprints (run here, with the project)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dlis_market.protocol.fingerprint_thresholds import thresholds_for, validate
    from dlis_market.protocol.fingerprints import fingerprint_from_steps

    runs: dict[str, list[torch.Tensor]] = torch.load(data / "cpu_runs.pt", weights_only=True)
    runs |= torch.load(gpu / "gpu_runs.pt", weights_only=True)
    measured = json.loads((gpu / "gpu_tolerance.json").read_text())
    table = {}
    for label, row in PAIRS.items():
        dtype, a, b = row
        verdicts = [
            validate(fingerprint_from_steps([x.unsqueeze(0)]), y, thresholds_for(dtype))
            for x, y in zip(runs[a], runs[b], strict=True)
        ]
        rejected = sum(not v.accepted for v in verdicts)
        kind = "false accusations" if "honest" in label else "caught"
        table[label] = {"dtype": dtype, "calls": len(verdicts), "rejected": rejected,
                        "outcome": f"{kind} {rejected}/{len(verdicts)}",
                        "reasons": sorted({v.reason for v in verdicts if not v.accepted})[:3]}  # fmt: skip
        print(f"{label:45s} {table[label]['outcome']}")
    result = {"device": measured["device"], "layers": measured["layers"], "pairs": table}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_fingerprints.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["prepare", "measure", "fingerprints"])
    ap.add_argument("--gpu", type=Path, help="fingerprints: the folder measure wrote")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=Path(".gpu"))
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of measure")
    ap.add_argument("--layers", default=f"{FIRST}:{LAST}", help="prepare: SmolLM2 layers START:END (8 fit the 64 MiB)")
    args = ap.parse_args()
    if args.mode == "prepare":
        first, last = (int(x) for x in args.layers.split(":"))
        prepare(args.out or Path(".gpu"), first, last)
    elif args.mode == "measure":
        measure(args.data, args.out, args.device)
    else:
        fingerprints(args.data, args.gpu, args.out)


if __name__ == "__main__":
    main()
