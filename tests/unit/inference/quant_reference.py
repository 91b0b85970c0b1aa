"""What the int8 / nf4 formats promise, computed from their definitions in plain torch.

The bound for one quantized linear ``y = x W^T`` is the error of the *ideal* quantization of that
very layer (round-to-nearest in the format, exact arithmetic) plus the rounding of the bf16
compute dtype. It depends only on the weights, the input and the format, never on the processor
or on which bitsandbytes kernel runs: a kernel that honours the format stays inside it on every
CPU, and a kernel that applies a wrong scale (bitsandbytes 0.50.2's AVX-512 4-bit dequantizer when
a row is shorter than one block: 0.35 relative error on a 32-wide layer) falls outside it.
"""

from __future__ import annotations

import torch
from torch import nn

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1] (QLoRA, Dettmers et al. 2023, sec. 3 and
# appendix E; bitsandbytes ``create_normal_map`` / ``backends/utils.py _NF4_QUANT_TABLE``).
NF4_LEVELS = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)
# NF4 as the exporter writes it: one fp32 absmax per 64 consecutive values (quantization.NF4_BLOCKSIZE).
NF4_BLOCK = 64
# LLM.int8 vector-wise (Dettmers et al. 2022, sec. 3.1): one absmax per row, values round(127 * w / absmax).
INT8_LEVELS = 127
# bf16 keeps 8 significant bits, so one round-to-nearest has relative error <= 2^-8. The layer
# rounds twice beyond the format itself (dequantized weight to bf16, output to bf16).
BF16_ROUNDING = 2 * 2.0**-8


def nf4_dequantized(weight: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest NF4 of ``weight`` (quantized from its bf16 copy, as the exporter does)."""
    w = weight.detach().to(torch.bfloat16).float()
    blocks = w.reshape(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    # Nearest level = the bucket between the midpoints of neighbouring levels.
    idx = torch.bucketize(blocks / absmax, (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    return (NF4_LEVELS[idx] * absmax).reshape(w.shape)


def int8_rowwise(t: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest row-wise absmax int8 of ``t``, dequantized."""
    t = t.detach().float()
    absmax = t.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(t * (INT8_LEVELS / absmax)) * (absmax / INT8_LEVELS)


def format_error_bound(weight: torch.Tensor, x: torch.Tensor, quantization: str) -> float:
    """Relative error ``||y - x W^T|| / ||x W^T||`` that a correct ``quantization`` layer stays under."""
    w = weight.detach().float()
    xf = x.float()
    exact = xf @ w.T
    if quantization == "nf4":
        deviation = (xf @ (w - nf4_dequantized(w)).T).norm()
    elif quantization == "int8":
        # Weights row-wise; LLM.int8 may also quantize the activations per token (threshold 0: no
        # fp16 outlier columns). Triangle inequality: the bound holds whether the kernel does or not.
        w_hat = int8_rowwise(w)
        deviation = (xf @ (w - w_hat).T).norm() + ((xf - int8_rowwise(xf)) @ w_hat.T).norm()
    else:
        raise ValueError(f"unknown quantization {quantization!r}")
    return float(deviation / exact.norm()) + BF16_ROUNDING


def linear_errors(
    fp32_model: nn.Module, quantized_model: nn.Module, quantization: str, rows: int = 16
) -> dict[str, tuple[float, float]]:
    """``name -> (relative error, bound)`` for every bitsandbytes linear of ``quantized_model``.

    Each layer gets the same seeded bf16 input; the reference is the fp32 layer on that input.
    """
    fp32 = dict(fp32_model.named_modules())
    out: dict[str, tuple[float, float]] = {}
    gen = torch.Generator().manual_seed(0)
    for name, module in quantized_model.named_modules():
        if type(module).__name__ not in ("Linear4bit", "Linear8bitLt"):
            continue
        weight = fp32[name].weight  # type: ignore[union-attr]
        x = torch.randn(rows, weight.shape[1], generator=gen).to(torch.bfloat16)
        with torch.no_grad():
            got = module(x).float()
            exact = x.float() @ weight.detach().float().T
        err = float((got - exact).norm() / exact.norm())
        out[name] = (err, format_error_bound(weight, x, quantization))
    return out
