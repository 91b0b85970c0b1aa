"""The Llama family (Llama, SmolLM2, and any HF model with the same layout)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

from dlis_market.inference.families.base import Family, first_output


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

    def run_layers(
        self,
        model: Any,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache,
        config: PretrainedConfig,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Mask before the layers update the cache, exactly as LlamaModel.forward does.
        mask = create_causal_mask(
            config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache, position_ids=position_ids
        )
        rotary = model.model.rotary_emb(hidden, position_ids=position_ids)
        for layer in model.model.layers:
            hidden = first_output(
                layer(
                    hidden,
                    attention_mask=mask,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=True,
                    position_embeddings=rotary,
                )
            )
        return hidden

    def head(self, model: Any, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = model.lm_head(model.model.norm(hidden)[:, -1:, :])
        return logits
