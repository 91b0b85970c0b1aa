"""Export a Hugging Face model folder as one safetensors shard per layer range + a manifest.

Deterministic: tensors are written in sorted order with fixed metadata, zstd uses a fixed level
and no threads, JSON is key-sorted; the same input gives byte-identical files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import zstandard
from safetensors.torch import save
from transformers import AutoConfig, AutoModelForCausalLM

from dlis_market.inference.errors import ShardError
from dlis_market.inference.families import Family, family_for
from dlis_market.inference.manifest import (
    MANIFEST_NAME,
    TOKENIZER_FILES,
    FileEntry,
    Manifest,
    ShardDtype,
    StageEntry,
    file_entry,
)
from dlis_market.inference.quantization import (
    compute_dtype,
    is_quantized_in_shards,
    quantizable_linears,
    quantize_weight,
)
from dlis_market.types import LayerRange

ZSTD_LEVEL = 3
# Config keys that describe the exporting machine, not the model: where it loaded the folder from
# and its transformers version. Left in, the same model exported on two machines would get two
# manifests, so two manifest sha256s and two CIDs for identical weights.
MACHINE_CONFIG_KEYS = ("_name_or_path", "transformers_version")


def even_ranges(num_layers: int, stages: int) -> list[LayerRange]:
    """``stages`` contiguous ranges of near-equal size covering ``[0, num_layers)``."""
    if not 1 <= stages <= num_layers:
        raise ShardError(f"--stages {stages} is invalid for a {num_layers}-layer model; use 1..{num_layers}")
    base, extra = divmod(num_layers, stages)
    ranges, start = [], 0
    for i in range(stages):
        end = start + base + (1 if i < extra else 0)
        ranges.append(LayerRange(start=start, end=end))
        start = end
    return ranges


def _check_ranges(ranges: Sequence[LayerRange], num_layers: int) -> None:
    start = 0
    for r in ranges:
        if r.start != start:
            raise ShardError(
                f"layer ranges must tile [0, {num_layers}) in order; got {r} after layer {start}. "
                "Fix the plan so each range starts where the previous one ended"
            )
        start = r.end
    if start != num_layers:
        raise ShardError(f"layer ranges end at {start} but the model has {num_layers} layers; fix the plan")


def _stage_tensors(
    family: Family,
    state: dict[str, torch.Tensor],
    layers: LayerRange,
    first: bool,
    last: bool,
    tied: bool,
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        layer = family.layer_of(name)
        if layer is not None:
            keep = layers.start <= layer < layers.end
        elif name.startswith(family.first_stage_prefixes):
            keep = first
        elif name.startswith(family.last_stage_prefixes):
            keep = last
        else:
            raise ShardError(f"tensor {name!r} belongs to no stage; the {family.name} family module must name it")
        if keep:
            out[name] = tensor
    if last and tied:
        if first:
            out.pop(family.head_weight, None)  # tied to the embeddings held in the same file
        else:
            out[family.head_weight] = state[family.embed_weight]
    return out


def _convert(
    family: Family, tensors: dict[str, torch.Tensor], linear_weights: set[str], dtype: ShardDtype
) -> dict[str, torch.Tensor]:
    target = compute_dtype(dtype)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        if dtype in ("int8", "nf4") and name in linear_weights and is_quantized_in_shards(tensor, dtype):
            out.update(quantize_weight(name, tensor, dtype))
        elif tensor.is_floating_point():
            out[name] = tensor.detach().to(target).contiguous().clone()
        else:
            out[name] = tensor.detach().contiguous().clone()
    return out


def export_shards(
    model_dir: Path,
    out_dir: Path,
    ranges: Sequence[LayerRange] | None = None,
    stages: int | None = None,
    dtype: ShardDtype = "fp32",
    compress: bool = False,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Write one shard per range into ``out_dir`` (must be empty or absent) and return the manifest.
    ``progress`` is told each step as it starts (loading, then each stage), for a display."""
    say = progress or (lambda _step: None)
    if dtype not in ("fp32", "bf16", "int8", "nf4"):
        raise ShardError(f"unknown dtype {dtype!r}; use fp32, bf16, int8 or nf4")
    if not (model_dir / "config.json").is_file():
        raise ShardError(f"{model_dir} has no config.json; point at a Hugging Face model folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ShardError(f"{out_dir} is not empty; choose a new --out folder or delete it first")
    config = AutoConfig.from_pretrained(model_dir)
    family = family_for(config)
    num_layers = family.num_layers(config)
    if ranges is None:
        ranges = even_ranges(num_layers, stages or 1)
    _check_ranges(ranges, num_layers)
    quantization = dtype if dtype in ("int8", "nf4") else None
    if quantization and not family.supports_quantization:
        raise ShardError(f"{dtype} is not supported for the {family.name} family; use --dtype fp32 or bf16")

    say(f"loading {model_dir.name} ({num_layers} layers, fp32)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = dict(model.state_dict())
    linear_weights = {f"{n}.weight" for n in quantizable_linears(model, family.layers_path)}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    config_dict = {k: v for k, v in model.config.to_dict().items() if k not in MACHINE_CONFIG_KEYS}

    out_dir.mkdir(parents=True, exist_ok=True)
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0, write_checksum=True)
    stage_entries = []
    for index, layers in enumerate(ranges):
        first, last = index == 0, index == len(ranges) - 1
        say(f"writing stage {index + 1}/{len(ranges)} (layers {layers}, {dtype}{', zstd' if compress else ''})")
        tensors = _convert(family, _stage_tensors(family, state, layers, first, last, tied), linear_weights, dtype)
        # One metadata key: safetensors keeps metadata in a hash map whose order is not stable.
        meta = {"dlis": json.dumps({"model": name or model_dir.name, "layers": str(layers), "dtype": dtype})}
        blob = save(tensors, metadata=meta)
        filename = f"stage-{index:02d}-layers-{layers.start}-{layers.end}.safetensors"
        if compress:
            blob, filename = cctx.compress(blob), filename + ".zst"
        path = out_dir / filename
        path.write_bytes(blob)
        stage_entries.append(
            StageEntry(
                index=index,
                layers=layers,
                file=file_entry(out_dir, path),
                compression="zstd" if compress else "none",
                has_embeddings=first,
                has_head=last,
                tensor_names=sorted(tensors),
            )
        )
        del tensors, blob

    config_path = out_dir / "config.json"
    config_path.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    tokenizer_entries: list[FileEntry] = []
    for fname in TOKENIZER_FILES:
        if (model_dir / fname).is_file():
            shutil.copyfile(model_dir / fname, out_dir / fname)
            tokenizer_entries.append(file_entry(out_dir, out_dir / fname))
    model_name = name or model_dir.name
    manifest = Manifest(
        model_name=model_name,
        architecture=family.name,
        model_type=str(config.model_type),
        num_layers=num_layers,
        dtype=dtype,
        quantization=quantization,
        tie_word_embeddings=tied,
        config=json.loads(config_path.read_text()),
        config_file=file_entry(out_dir, config_path),
        tokenizer_files=tokenizer_entries,
        stages=stage_entries,
    )
    (out_dir / MANIFEST_NAME).write_text(manifest.dumps())
    return manifest
