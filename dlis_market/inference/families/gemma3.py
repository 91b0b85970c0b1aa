"""The Gemma3 (text) family: scaled embeddings, sliding/full layers, soft-capped logits."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Gemma3ForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from dlis_market.inference.families.base import first_output
from dlis_market.inference.families.llama import LlamaFamily


class Gemma3Family(LlamaFamily):
    """Llama's tensor layout; its own layer loop (per-layer-type masks and rotary embeddings)."""

    name = "gemma3"
    model_types = ("gemma3_text",)

    def model_class(self) -> type[PreTrainedModel]:
        return Gemma3ForCausalLM

    def run_layers(
        self,
        model: Any,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache,
        config: PretrainedConfig,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {
            "config": config,
            "inputs_embeds": hidden,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        masks = {
            "full_attention": create_causal_mask(**kwargs),
            "sliding_attention": create_sliding_window_causal_mask(**kwargs),
        }
        rotary = {kind: model.model.rotary_emb(hidden, position_ids, kind) for kind in set(config.layer_types)}
        for kind, layer in zip(config.layer_types, model.model.layers, strict=True):
            hidden = first_output(
                layer(
                    hidden,
                    position_embeddings=rotary[kind],
                    attention_mask=masks[kind],
                    position_ids=position_ids,
                    cache=cache,
                )
            )
        return hidden

    def head(self, model: Any, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = model.lm_head(model.model.norm(hidden)[:, -1:, :])
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
