"""int8 / nf4 shards are as accurate as their formats promise, on any processor.

Per layer: every quantized linear of a loaded stage stays within the error of the ideal
quantization of that layer plus bf16 rounding (:mod:`.quant_reference`). End to end, on the real
SmolLM2 weights: the sharded quantized model predicts the fp32 model's next token as often as
transformers' own bitsandbytes model in the same format does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from dlis_market.inference.errors import ShardError
from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.quantization import bitsandbytes_module, install_quantized, quantize_weight, uses_cpu_gemm
from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import Stage

from .quant_reference import linear_errors

# Natural text for teacher-forced next-token agreement (121 positions with SmolLM2's tokenizer).
TEXTS = (
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Water boils at one hundred degrees Celsius at sea level, and freezes at zero.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "In 1492, Christopher Columbus sailed across the Atlantic Ocean from Spain.",
    "To make a cup of tea, first boil the water, then pour it over the tea leaves.",
)
# Two correct implementations of one format differ only by kernel rounding (and, for int8, by
# whether activations are quantized too), which flips the top-1 token at near-ties either way.
# 0.05 of 121 positions is 6 flips, about 1.2 binomial standard deviations of a 0.7 agreement rate
# (sqrt(0.7 * 0.3 / 121) = 0.042). Measured (AMD EPYC, AVX512-BF16, eval-mode kernels): nf4 0.727
# and int8 0.934, the same as transformers' (same top-1 everywhere). int8's dequantize-then-matmul
# (training mode, before 2026-11-30) reached 0.967 at half the speed.
AGREEMENT_SLACK = 0.05
GREEDY_TOKENS = 16


def _stage(model_dir: Path, out: Path, dtype: str) -> Stage:
    export_shards(model_dir, out, stages=1, dtype=dtype)  # type: ignore[arg-type]
    return Stage.load(out, index=0)


def _fp32(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _check_layers(fp32: torch.nn.Module, stage: Stage, dtype: str) -> dict[str, tuple[float, float]]:
    errors = linear_errors(fp32, stage.model, dtype)
    assert errors, "no quantized linear in the stage"
    over = {name: e for name, e in errors.items() if e[0] > e[1]}
    assert not over, f"{len(over)}/{len(errors)} layers exceed the {dtype} bound (error, bound): {over}"
    return errors


@pytest.mark.parametrize("dtype", ["int8", "nf4"])
def test_tiny_model_layers_stay_within_the_format_bound(
    dtype: str, tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    model_dir = tiny_model_dir("llama")
    _check_layers(_fp32(model_dir), _stage(model_dir, tmp_path / dtype, dtype), dtype)


def test_nf4_shard_with_rows_shorter_than_a_block_is_refused() -> None:
    # An older export stored 32-wide linears as nf4; AVX-512 CPUs would run them with wrong scales.
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(32, 16, bias=False)])
    tensors = quantize_weight("layers.0.weight", torch.randn(16, 32), "nf4")
    with pytest.raises(ShardError, match=r"32-value rows, not a multiple of the 64-value block.*Re-export"):
        install_quantized(model, "layers", tensors, "nf4")


def test_nf4_layer_with_output_rows_outside_the_packed_tiles_stays_exact() -> None:
    # bitsandbytes' AVX512-BF16 gemm repacks weights in tiles of 32 output rows (and asserts on
    # other widths); a 48-row layer keeps the dequantize path and the format's accuracy.
    fp32 = torch.nn.Module()
    torch.manual_seed(0)
    fp32.layers = torch.nn.ModuleList([torch.nn.Linear(64, 48, bias=False), torch.nn.Linear(128, 64, bias=False)])
    quantized = copy.deepcopy(fp32)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in fp32.named_parameters():
        tensors.update(quantize_weight(name, param, "nf4"))
    install_quantized(quantized, "layers", tensors, "nf4")
    packed = [uses_cpu_gemm(quantized.get_submodule(f"layers.{i}")) for i in range(2)]
    assert packed == [False, bool(bitsandbytes_module().functional.has_avx512bf16())]
    errors = linear_errors(fp32, quantized, "nf4")
    assert len(errors) == 2 and all(e <= bound for e, bound in errors.values()), errors


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_dir: Path) -> torch.nn.Module:
    return _fp32(smollm2_dir)


@pytest.fixture(scope="module", params=["int8", "nf4"])
def smollm2_quantized(
    request: pytest.FixtureRequest, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Stage]]:
    dtype: str = request.param
    yield dtype, _stage(smollm2_dir, tmp_path_factory.mktemp(f"smollm2-{dtype}") / "shards", dtype)


def test_smollm2_layers_stay_within_the_format_bound(
    smollm2_quantized: tuple[str, Stage], smollm2_fp32: torch.nn.Module
) -> None:
    dtype, stage = smollm2_quantized
    errors = _check_layers(smollm2_fp32, stage, dtype)
    assert len(errors) == 30 * 7  # q, k, v, o, gate, up, down of every layer


def _top1(model: torch.nn.Module, seqs: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([s])).logits[0].argmax(-1) for s in seqs])


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_quantized: tuple[str, Stage], smollm2_dir: Path) -> torch.nn.Module:
    """transformers' own bitsandbytes model in the format of ``smollm2_quantized`` (eval mode)."""
    dtype, _ = smollm2_quantized
    config = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        if dtype == "nf4"
        else BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)  # no fp16 outliers, as ours
    )
    return AutoModelForCausalLM.from_pretrained(
        smollm2_dir, quantization_config=config, dtype=torch.bfloat16, device_map="cpu"
    ).eval()


def test_smollm2_predicts_like_transformers_own_quantization(
    smollm2_quantized: tuple[str, Stage],
    smollm2_transformers: torch.nn.Module,
    smollm2_fp32: torch.nn.Module,
    smollm2_dir: Path,
) -> None:
    dtype, stage = smollm2_quantized
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    seqs = [tokenizer(t)["input_ids"] for t in TEXTS]
    # Both in eval mode: the same bitsandbytes kernels for this CPU (nf4 with AVX512-BF16: the packed
    # gemm; int8: activations quantized too, as test_planner_quant pins for the stage) on the same
    # quantized weights (both quantize the bf16 weights), so the same top-1 at every position.
    want, ours_top1 = _top1(smollm2_fp32, seqs), _top1(stage.model, seqs)
    their_top1 = _top1(smollm2_transformers, seqs)
    same = (ours_top1 == their_top1).float().mean().item()
    assert same == 1.0, f"{dtype} shards' top-1 differs from transformers' in {1 - same:.3f} of {len(want)} positions"
    ours = (ours_top1 == want).float().mean().item()
    reference = (their_top1 == want).float().mean().item()
    assert ours >= reference - AGREEMENT_SLACK, (
        f"{dtype} shards agree with fp32 on {ours:.3f} of {len(want)} next tokens, transformers' own "
        f"{dtype} model on {reference:.3f}"
    )


def test_smollm2_pipeline_decodes_the_greedy_tokens_of_transformers(
    smollm2_quantized: tuple[str, Stage], smollm2_transformers: torch.nn.Module, smollm2_dir: Path
) -> None:
    # Decode steps (one token: bitsandbytes' gemv shapes, the KV cache) through the pipeline.
    dtype, stage = smollm2_quantized
    prompt = AutoTokenizer.from_pretrained(smollm2_dir)(TEXTS[0])["input_ids"]
    ours = LocalPipeline([stage]).generate_ids([prompt], GREEDY_TOKENS)[0].token_ids
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = smollm2_transformers.generate(  # type: ignore[operator]
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=0
        )
    assert ours == out[0, len(prompt) :].tolist(), f"{dtype}: greedy tokens differ from transformers'"
