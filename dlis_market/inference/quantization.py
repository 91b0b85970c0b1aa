"""int8 / nf4 weights through bitsandbytes (works on CPU), fp32 / bf16 as is.

Only the ``nn.Linear`` projections inside decoder layers are quantized (embeddings, norms and the
LM head stay in the compute dtype, as bitsandbytes does by default). Shards store the quantized
form, so a stage never holds the full-precision weights:

- int8: ``<linear>.weight`` (int8, row-wise) + ``<linear>.SCB`` (fp32 row scales);
- nf4: ``<linear>.weight`` (packed uint8) + ``<linear>.weight.<quant-state key>`` tensors.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_f
import torch
from accelerate import init_empty_weights
from torch import nn

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
