"""What an architecture family must provide so its layers can run as pipeline stages.

A family knows three things about a Hugging Face causal LM: where its tensors live (which names
belong to the embeddings, to layer ``i``, to the final norm and head), how to build a per-stage
config, and how to run the three pieces (embed, a range of layers, head) with a stage-owned KV
cache, rotary embeddings and causal mask. Everything else (loading, sessions, batching) is shared.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

from dlis_market.types import LayerRange


@dataclass(frozen=True)
class StageInputs:
    """What every family's layer loop starts from. The causal masks are built from it before the
    layers update the cache, exactly as the transformers models' own ``forward`` does."""

    hidden: torch.Tensor
    position_ids: torch.Tensor
    cache: Cache
    config: PretrainedConfig
    attention_mask: torch.Tensor | None

    def mask_inputs(self) -> dict[str, Any]:
        """Keyword arguments of transformers' ``create_*_causal_mask`` builders."""
        return {
            "config": self.config,
            "inputs_embeds": self.hidden,
            "attention_mask": self.attention_mask,
            "cache": self.cache,
            "position_ids": self.position_ids,
        }

    def causal_mask(self) -> Any:
        return create_causal_mask(**self.mask_inputs())


class Family(ABC):
    """One architecture family (Llama, GPT-2, Gemma3...)."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    layers_path: ClassVar[str]
    first_stage_prefixes: ClassVar[tuple[str, ...]]
    last_stage_prefixes: ClassVar[tuple[str, ...]]
    embed_weight: ClassVar[str]
    head_weight: ClassVar[str] = "lm_head.weight"
    supports_quantization: ClassVar[bool] = True

    @abstractmethod
    def model_class(self) -> type[PreTrainedModel]:
        """The transformers class whose state-dict names the shards use."""

    @abstractmethod
    def embed(self, model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` -> hidden states ``[B, T, H]`` (first stage only)."""

    def run_layers(
        self,
        model: Any,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache,
        config: PretrainedConfig,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the stage's layers; ``config`` is the stage config (its own layer count).

        ``attention_mask`` (``[B, cached + T]``, False = padding) marks the cache slots each row may
        attend to, for rows of a batch whose caches were padded to one length; None: all of them.
        """
        return self.layer_loop(model, StageInputs(hidden, position_ids, cache, config, attention_mask))

    @abstractmethod
    def layer_loop(self, model: Any, x: StageInputs) -> torch.Tensor:
        """The family's own loop over the stage's layers (what :meth:`run_layers` runs)."""

    @abstractmethod
    def head(self, model: Any, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden ``[B, T, H]`` -> logits ``[B, 1, V]`` of the last position (last stage only).

        The final norm runs over all positions before slicing, as transformers does: norm
        reductions over a different shape are not bit-identical.
        """

    # ------------------------------------------------------------------ shared helpers

    def num_layers(self, config: PretrainedConfig) -> int:
        return int(config.num_hidden_layers)

    def layer_of(self, tensor_name: str) -> int | None:
        """The layer index a tensor belongs to, or None for embeddings/norm/head tensors."""
        prefix = self.layers_path + "."
        if not tensor_name.startswith(prefix):
            return None
        return int(tensor_name[len(prefix) :].split(".", 1)[0])

    def stage_config(self, config: PretrainedConfig, layers: LayerRange) -> PretrainedConfig:
        """A copy of ``config`` that describes only ``layers`` (count and per-layer types)."""
        stage = copy.deepcopy(config)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            stage.layer_types = list(layer_types[layers.start : layers.end])
        stage.num_hidden_layers = layers.size
        return stage

    def get_layers(self, model: Any) -> nn.ModuleList:
        layers = model.get_submodule(self.layers_path)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"{self.layers_path} of {type(model).__name__} is not a ModuleList")
        return layers

    def keep_layers(self, model: Any, layers: LayerRange) -> None:
        """Drop every layer outside ``layers`` and renumber the kept ones' cache index from 0."""
        kept = nn.ModuleList(list(self.get_layers(model))[layers.start : layers.end])
        for local_idx, layer in enumerate(kept):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = local_idx  # type: ignore[assignment]
        parent_path, _, attr = self.layers_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, kept)


def first_output(out: Any) -> torch.Tensor:
    """Decoder layers return a tensor or a tuple whose first item is the hidden states."""
    if isinstance(out, tuple):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"decoder layer returned {type(out).__name__}, expected a tensor")
    return out
