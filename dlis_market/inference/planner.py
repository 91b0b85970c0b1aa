"""Partition planning: model profile + device profiles -> layer ranges ``[start, end)``.

Pure functions. A stage's time per token is what its device needs to stream its weights
(bytes / bandwidth) plus to compute them (2 FLOP per weight / FLOP/s); its memory is its weights
plus the KV cache for ``kv_tokens`` tokens plus the embeddings (first stage) and head (last stage).
Devices are used in the order given (the pipeline order), each serving at least one layer; the
plan minimises the slowest stage under every device's memory limit (exact dynamic programme).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from accelerate import init_empty_weights
from pydantic import BaseModel, ConfigDict, Field
from transformers import PretrainedConfig

from dlis_market.inference.errors import PlanError
from dlis_market.inference.families import family_for
from dlis_market.types import LayerRange

BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + 4 / 512, "nf4": 0.5 + 4 / 64}
ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "int8": 2, "nf4": 2}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeviceProfile(_Frozen):
    """What a device offers: memory for weights + KV cache, compute and memory bandwidth."""

    name: str
    memory_bytes: int = Field(gt=0)
    flops: float = Field(gt=0, description="sustained FLOP/s")
    bandwidth: float = Field(gt=0, description="memory bandwidth, bytes/s")


class ModelProfile(_Frozen):
    """Sizes that drive the plan, derived from the config (no weights needed)."""

    num_layers: int
    layer_weights: int
    embed_weights: int
    head_weights: int
    kv_bytes_per_token_layer: int
    bytes_per_weight: float


class Plan(_Frozen):
    ranges: list[LayerRange]
    devices: list[str]
    stage_seconds_per_token: list[float]
    stage_memory_bytes: list[int]


def model_profile(config: PretrainedConfig, dtype: str = "fp32") -> ModelProfile:
    """Count weights per layer by building the model on the meta device (costs no memory)."""
    if dtype not in BYTES_PER_WEIGHT:
        raise PlanError(f"unknown dtype {dtype!r}; use one of {', '.join(BYTES_PER_WEIGHT)}")
    family = family_for(config)
    with init_empty_weights():
        model = family.model_class()(config)
    layers = family.get_layers(model)
    layer_weights = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    embed = sum(p.numel() for n, p in model.named_parameters() if n.startswith(family.first_stage_prefixes))
    head = sum(
        p.numel() for n, p in model.named_parameters(remove_duplicate=False) if n.startswith(family.last_stage_prefixes)
    )
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return ModelProfile(
        num_layers=family.num_layers(config),
        layer_weights=layer_weights,
        embed_weights=embed,
        head_weights=head,
        kv_bytes_per_token_layer=2 * heads * head_dim * ACTIVATION_BYTES[dtype],
        bytes_per_weight=BYTES_PER_WEIGHT[dtype],
    )


def stage_cost(
    model: ModelProfile, device: DeviceProfile, n_layers: int, first: bool, last: bool, kv_tokens: int
) -> tuple[float, int]:
    """(seconds per token, bytes of memory) for ``n_layers`` layers on ``device``."""
    weights = n_layers * model.layer_weights + (model.head_weights if last else 0)
    memory = (
        weights + (model.embed_weights if first else 0)
    ) * model.bytes_per_weight + n_layers * kv_tokens * model.kv_bytes_per_token_layer
    seconds = weights * model.bytes_per_weight / device.bandwidth + 2 * weights / device.flops
    return seconds, math.ceil(memory)


def plan_partition(model: ModelProfile, devices: Sequence[DeviceProfile], kv_tokens: int = 2048) -> Plan:
    """Ranges for ``devices`` in order that fit memory and minimise the slowest stage."""
    n, d = model.num_layers, len(devices)
    if d == 0:
        raise PlanError("no devices given; describe at least one device (memory, FLOP/s, bandwidth)")
    if d > n:
        raise PlanError(f"{d} devices for a {n}-layer model: each stage needs at least one layer; use at most {n}")
    inf = float("inf")
    # best[i][j]: minimal bottleneck time with devices[:i] serving layers [0, j).
    best = [[inf] * (n + 1) for _ in range(d + 1)]
    cut = [[0] * (n + 1) for _ in range(d + 1)]
    best[0][0] = 0.0
    for i in range(1, d + 1):
        for j in range(i, n - (d - i) + 1):
            for k in range(i - 1, j):
                if best[i - 1][k] == inf:
                    continue
                t, mem = stage_cost(model, devices[i - 1], j - k, k == 0, j == n, kv_tokens)
                if mem > devices[i - 1].memory_bytes:
                    continue
                cand = max(best[i - 1][k], t)
                if cand < best[i][j]:
                    best[i][j], cut[i][j] = cand, k
    if best[d][n] == inf:
        need = stage_cost(model, devices[0], n, True, True, kv_tokens)[1]
        have = sum(dev.memory_bytes for dev in devices)
        offered = ", ".join(f"{x.name}={x.memory_bytes / 2**20:.1f}" for x in devices)
        per_layer = model.layer_weights * model.bytes_per_weight + kv_tokens * model.kv_bytes_per_token_layer
        raise PlanError(
            f"the {n}-layer model does not fit: it needs about {need / 2**20:.1f} MiB in total "
            f"({per_layer / 2**20:.2f} MiB per layer incl. KV cache for {kv_tokens} tokens) "
            f"and the {d} devices "
            f"offer {have / 2**20:.1f} MiB ({offered}); "
            "add devices or memory, use a smaller dtype (bf16/int8/nf4) or fewer KV tokens"
        )
    ranges: list[LayerRange] = []
    j = n
    for i in range(d, 0, -1):
        k = cut[i][j]
        ranges.append(LayerRange(start=k, end=j))
        j = k
    ranges.reverse()
    costs = [
        stage_cost(model, dev, r.size, r.start == 0, r.end == n, kv_tokens)
        for dev, r in zip(devices, ranges, strict=True)
    ]
    return Plan(
        ranges=ranges,
        devices=[dev.name for dev in devices],
        stage_seconds_per_token=[c[0] for c in costs],
        stage_memory_bytes=[c[1] for c in costs],
    )
