"""The Gemma3 (text) family: scaled embeddings, sliding/full layers, soft-capped logits."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Gemma3ForCausalLM, PreTrainedModel
from transformers.masking_utils import create_sliding_window_causal_mask

from dlis_market.inference.families.base import StageInputs, first_output
from dlis_market.inference.families.llama import LlamaFamily


class Gemma3Family(LlamaFamily):
    """Llama's tensor layout; its own layer loop (per-layer-type masks and rotary embeddings)."""

    name = "gemma3"
    model_types = ("gemma3_text",)

    def model_class(self) -> type[PreTrainedModel]:
        return Gemma3ForCausalLM

    def layer_loop(self, model: Any, x: StageInputs) -> torch.Tensor:
        masks = {
            "full_attention": x.causal_mask(),
            "sliding_attention": create_sliding_window_causal_mask(**x.mask_inputs()),
        }
        layer_types = x.config.layer_types
        rotary = {kind: model.model.rotary_emb(x.hidden, x.position_ids, kind) for kind in set(layer_types)}
        hidden = x.hidden
        for kind, layer in zip(layer_types, model.model.layers, strict=True):
            hidden = first_output(
                layer(
                    hidden,
                    position_embeddings=rotary[kind],
                    attention_mask=masks[kind],
                    position_ids=x.position_ids,
                    cache=x.cache,
                )
            )
        return hidden

    def head(self, model: Any, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = model.lm_head(model.model.norm(hidden)[:, -1:, :])
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
