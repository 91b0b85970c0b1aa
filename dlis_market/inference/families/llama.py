"""The Llama family (Llama, SmolLM2, and any HF model with the same layout)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaForCausalLM, PreTrainedModel

from dlis_market.inference.families.base import Family, StageInputs, first_output


class LlamaFamily(Family):
    name = "llama"
    model_types = ("llama",)
    layers_path = "model.layers"
    first_stage_prefixes = ("model.embed_tokens.",)
    last_stage_prefixes = ("model.norm.", "lm_head.")
    embed_weight = "model.embed_tokens.weight"

    def model_class(self) -> type[PreTrainedModel]:
        return LlamaForCausalLM

    def embed(self, model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model.model.embed_tokens(input_ids)
        return out

    def layer_loop(self, model: Any, x: StageInputs) -> torch.Tensor:
        mask = x.causal_mask()
        rotary = model.model.rotary_emb(x.hidden, position_ids=x.position_ids)
        hidden = x.hidden
        for layer in model.model.layers:
            hidden = first_output(
                layer(
                    hidden,
                    attention_mask=mask,
                    position_ids=x.position_ids,
                    cache=x.cache,
                    use_cache=True,
                    position_embeddings=rotary,
                )
            )
        return hidden

    def head(self, model: Any, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = model.lm_head(model.model.norm(hidden)[:, -1:, :])
        return logits
