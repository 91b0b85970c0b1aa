"""int8 / nf4 weights through bitsandbytes (works on CPU), fp32 / bf16 as is.

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
"""

from __future__ import annotations

import logging

# bitsandbytes >= 0.49 on a CPU with AVX512-BF16 tries, at import, to download a gemm kernel from
# the Hugging Face hub through the optional `kernels` package, and logs a warning on every import
# when that fails. Downloading code at run time cannot work offline (and is not something a worker
# should do); bitsandbytes then uses its bundled kernel, so the warning says nothing actionable.
# Drop that one message from its logger before the import; every other bitsandbytes warning stays.
_HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_hub_kernel_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_HUB_KERNEL_WARNING)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_hub_kernel_warning)

import bitsandbytes as bnb  # noqa: E402  (after the log filter above)
import bitsandbytes.functional as bnb_f  # noqa: E402
import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from torch import nn  # noqa: E402

from dlis_market.inference.errors import ShardError  # noqa: E402

NF4_BLOCKSIZE = 64
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
        param = bnb.nn.Int8Params(weight.detach().float().clone(), requires_grad=False, has_fp16_weights=False)
        param = param.to("cpu")  # type: ignore[misc]  # moving to a device quantizes row-wise
        return {name: param.data.contiguous(), f"{module_name}.SCB": param.SCB.contiguous()}
    if quantization == "nf4":
        packed, state = bnb_f.quantize_4bit(
            weight.detach().to(torch.bfloat16), blocksize=NF4_BLOCKSIZE, quant_type="nf4"
        )
        out = {name: packed.contiguous()}
        for key, value in state.as_dict(packed=True).items():
            out[f"{name}.{key}"] = value.contiguous()
        return out
    raise ValueError(f"unknown quantization {quantization!r}")


def install_quantized(model: nn.Module, layers_path: str, tensors: dict[str, torch.Tensor], quantization: str) -> None:
    """Swap the layers' nn.Linear modules for bitsandbytes ones holding the shard's quantized tensors.

    Pops the consumed tensors from ``tensors`` so the caller can load the rest normally.
    """
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
            cb = tensors.pop(weight_key)
            param = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
            param.CB = cb
            param.SCB = tensors.pop(f"{name}.SCB")
            new.weight = param
        else:
            stats_prefix = weight_key + "."
            stats = {k[len(stats_prefix) :]: tensors.pop(k) for k in list(tensors) if k.startswith(stats_prefix)}
            new.weight = bnb.nn.Params4bit.from_prequantized(
                tensors.pop(weight_key), stats, requires_grad=False, device="cpu"
            )
        if bias is not None:
            new.bias = nn.Parameter(bias, requires_grad=False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)
