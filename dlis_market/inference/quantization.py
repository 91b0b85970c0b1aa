"""int8 / nf4 weights through bitsandbytes (CPU and CUDA), fp32 / bf16 as is.

Only the ``nn.Linear`` projections inside decoder layers are quantized (embeddings, norms and the
LM head stay in the compute dtype, as bitsandbytes does by default). Shards store the quantized
form, so a stage never holds the full-precision weights:

- int8: ``<linear>.weight`` (int8, row-wise) + ``<linear>.SCB`` (fp32 row scales);
- nf4: ``<linear>.weight`` (packed uint8) + ``<linear>.weight.<quant-state key>`` tensors.

nf4 quantizes only linears whose rows hold whole 64-value blocks (``in_features % 64 == 0``; every
layer of SmolLM2, Llama, Gemma). bitsandbytes 0.50.2's AVX-512 CPU kernels (4-bit dequantize, and
the AVX512-BF16 packed gemm) index the block scales as ``[row, column // 64]``, so a block that
spans two rows silently gets another block's scale (0.35 relative error on a 32-wide layer; the
scalar kernel of other CPUs is right). Narrower linears stay in bf16.

The installed modules are in eval mode, because bitsandbytes picks its CPU kernels by
``module.training`` (0.50.2), and in training mode both formats run a slow dequantize-then-matmul:

- nf4 on a CPU with AVX512-BF16 runs the packed 4-bit gemm (``gemv_4bit``), as transformers' own
  nf4 models do: 2x the decode speed of the dequantize path. The weight is repacked into 32-row
  tiles at load (:func:`install_quantized`, not on the first forward as bitsandbytes would do), so
  a layer whose ``out_features`` is not a multiple of 32 cannot use it and keeps the dequantize
  path (:data:`NF4_PACKED_ROWS`). Other CPUs have one nf4 path whatever the mode.
- int8 runs LLM.int8's inference path: activations quantized per token, an int8 x int8 -> int32
  matmul (``torch._int_mm`` on AVX-512, elsewhere an fp32 matmul of the same integers: the same
  sums while they stay under 2**24), the output rescaled. So it is the same on every CPU, runs the
  arithmetic of the GPU kernel (which always quantizes activations) and of transformers' int8
  models, and is the path ``protocol/outputs.py``'s int8 tolerance was measured on
  (``bench/gpu_tolerance.py`` runs its CPU side in eval mode). It is 2x as fast as dequantizing the
  weight on every call, at a cost in accuracy on SmolLM2: next-token agreement with fp32 0.934
  (transformers' own int8: the same) against 0.967.

On CUDA (:func:`install_quantized` with a CUDA ``device``) the shard's quantized tensors go to
the GPU as they are and bitsandbytes runs its CUDA kernels on them: int8 row-wise weights and
scales are what ``Int8Params`` makes when it quantizes on ``.to("cuda")``, and the nf4 packing
and block scales are the same format on both devices (the CPU-only repacking below is skipped).
So a GPU stage serves the very weights a CPU stage of the same shard serves; transformers
quantizes its own bf16 weights on the GPU instead, which for these formats gives the same values.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType
from typing import TYPE_CHECKING, cast

import torch
from accelerate import init_empty_weights
from torch import nn

from dlis_market.inference.errors import ShardError

if TYPE_CHECKING:
    import bitsandbytes as bnb

# bitsandbytes >= 0.49 on a CPU with AVX512-BF16 tries, at import, to download a gemm kernel from
# the Hugging Face hub through the optional `kernels` package, and logs a warning on every import
# when that fails. Downloading code at run time cannot work offline (and is not something a worker
# should do); bitsandbytes then uses its bundled kernel, so the warning says nothing actionable.
# Drop that one message from its logger before the import; every other bitsandbytes warning stays.
_HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_hub_kernel_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_HUB_KERNEL_WARNING)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_hub_kernel_warning)

# int8 in eval mode (see below) quantizes activations from float16, so bitsandbytes casts the bf16
# activations first, as the format is defined, and warns so on every call of every layer: 210
# lines per SmolLM2 token. SmolLM2's largest linear input is ~3e3, well inside float16's 6.5e4.
_INT8_CAST_WARNING = "MatMul8bitLt: inputs will be cast from"


def _not_int8_cast_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_INT8_CAST_WARNING)


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_int8_cast_warning)


def bitsandbytes_module() -> ModuleType:
    """bitsandbytes, imported on first use (after the log filters above): it adds ~1 s to the
    start of every broker and worker process, and only int8 / nf4 shards need it."""
    import bitsandbytes
    import bitsandbytes.functional  # the submodule ``functional`` below

    return bitsandbytes


NF4_BLOCKSIZE = 64
# bitsandbytes' AVX512-BF16 4-bit gemm packs weight rows in tiles of 32 (``_convert_weight_packed_for_cpu``).
NF4_PACKED_ROWS = 32
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "nf4": torch.bfloat16}


def compute_dtype(dtype: str) -> torch.dtype:
    """The dtype activations and unquantized tensors use for a shard dtype."""
    return _DTYPES[dtype]


def quantizable_linears(model: nn.Module, layers_path: str) -> dict[str, nn.Linear]:
    """``name -> module`` for every nn.Linear inside the decoder layers."""
    prefix = layers_path + "."
    return {
        name: module for name, module in model.named_modules() if name.startswith(prefix) and type(module) is nn.Linear
    }


def is_quantized_in_shards(weight: torch.Tensor, quantization: str) -> bool:
    """Whether the exporter stores this linear weight (``[out, in]``) quantized; see the module doc."""
    return quantization == "int8" or (quantization == "nf4" and weight.shape[1] % NF4_BLOCKSIZE == 0)


def quantize_weight(name: str, weight: torch.Tensor, quantization: str) -> dict[str, torch.Tensor]:
    """The shard tensors for one linear weight (``name`` ends in ``.weight``)."""
    module_name = name.removesuffix(".weight")
    if quantization == "int8":
        # From the bf16 copy, as for nf4 and as transformers quantizes a bf16 checkpoint: the same
        # int8 weights as its model (fp32-rounded scales flipped 6 of 121 SmolLM2 next tokens).
        source = weight.detach().to(torch.bfloat16).float().clone()
        param = bitsandbytes_module().nn.Int8Params(source, requires_grad=False, has_fp16_weights=False)
        param = param.to("cpu")  # moving to a device quantizes row-wise
        return {name: param.data.contiguous(), f"{module_name}.SCB": param.SCB.contiguous()}
    if quantization == "nf4":
        packed, state = bitsandbytes_module().functional.quantize_4bit(
            weight.detach().to(torch.bfloat16), blocksize=NF4_BLOCKSIZE, quant_type="nf4"
        )
        out = {name: packed.contiguous()}
        for key, value in state.as_dict(packed=True).items():
            out[f"{name}.{key}"] = value.contiguous()
        return out
    raise ValueError(f"unknown quantization {quantization!r}")


def install_quantized(
    model: nn.Module,
    layers_path: str,
    tensors: dict[str, torch.Tensor],
    quantization: str,
    device: torch.device | str = "cpu",
) -> None:
    """Swap the layers' nn.Linear modules for bitsandbytes ones holding the shard's quantized tensors.

    The new modules' weights, scales and biases are on ``device``. Pops the consumed tensors from
    ``tensors`` so the caller can load the rest normally.
    """
    device = torch.device(device)
    bnb = bitsandbytes_module()
    for name, linear in quantizable_linears(model, layers_path).items():
        weight_key = f"{name}.weight"
        if weight_key not in tensors:
            continue  # a layer outside this stage's range
        if quantization == "nf4" and f"{weight_key}.absmax" not in tensors:
            continue  # kept in bf16 by the exporter (rows shorter than a block): loaded as is
        if quantization == "nf4" and linear.in_features % NF4_BLOCKSIZE != 0:
            raise ShardError(
                f"{weight_key} is stored as nf4 with {linear.in_features}-value rows, not a multiple of the "
                f"{NF4_BLOCKSIZE}-value block; bitsandbytes' AVX-512 kernels dequantize such a layer wrongly. "
                "Re-export the shards with this version of dlis (it keeps such layers in bf16)"
            )
        bias = tensors.pop(f"{name}.bias", None)
        bias = None if bias is None else bias.to(device)
        new: nn.Module
        with init_empty_weights(include_buffers=False):
            if quantization == "int8":
                new = bnb.nn.Linear8bitLt(
                    linear.in_features,
                    linear.out_features,
                    bias=bias is not None,
                    has_fp16_weights=False,
                    threshold=0.0,
                )
            else:
                new = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    bias=bias is not None,
                    compute_dtype=torch.bfloat16,
                    quant_type="nf4",
                )
        if quantization == "int8":
            cb = tensors.pop(weight_key).to(device)  # already int8: no second quantization
            param = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
            param.CB = cb
            param.SCB = tensors.pop(f"{name}.SCB").to(device)
            new.weight = param
        else:
            stats_prefix = weight_key + "."
            stats = {k[len(stats_prefix) :]: tensors.pop(k) for k in list(tensors) if k.startswith(stats_prefix)}
            new.weight = bnb.nn.Params4bit.from_prequantized(
                tensors.pop(weight_key), stats, requires_grad=False, device=device
            )
        if bias is not None:
            new.bias = nn.Parameter(bias, requires_grad=False)
        new.eval()  # bitsandbytes' inference kernels (see the module doc)
        if isinstance(new, bnb.nn.Linear4bit):
            _pack_for_cpu_gemm(new)  # CPU weights only
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)


def is_quantized_param(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a weight :func:`install_quantized` made (loaded, on the stage's device)."""
    bnb = sys.modules.get("bitsandbytes")  # not imported yet: no shard was loaded quantized
    return bnb is not None and isinstance(tensor, bnb.nn.Int8Params | bnb.nn.Params4bit)


def _pack_for_cpu_gemm(module: bnb.nn.Linear4bit) -> None:
    """Repack an nf4 weight for the AVX512-BF16 4-bit gemm now, where this CPU has that kernel.

    Linear4bit would do it on its first forward in eval mode (and fail on a layer whose
    out_features is not a multiple of 32); at load it costs no request any latency.
    """
    if not module.support_avx512bf16_for_cpu or module.weight.device.type != "cpu":
        return
    if module.out_features % NF4_PACKED_ROWS != 0:
        module.support_avx512bf16_for_cpu = False  # dequantize-then-matmul, as on other CPUs
        return
    weight = cast("bnb.nn.Params4bit", module.weight)
    weight.data, weight.quant_state = bitsandbytes_module().functional._convert_weight_packed_for_cpu(
        weight.data, weight.quant_state
    )


def uses_cpu_gemm(module: nn.Module) -> bool:
    """Whether an installed nf4 module runs bitsandbytes' packed AVX512-BF16 gemm."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))
