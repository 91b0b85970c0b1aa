"""The GPT-2 family: learned position embeddings, Conv1D projections, final LayerNorm."""

from __future__ import annotations

from typing import Any

import torch
from transformers import GPT2LMHeadModel, PretrainedConfig, PreTrainedModel

from dlis_market.inference.families.base import Family, StageInputs, first_output


class GPT2Family(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    first_stage_prefixes = ("transformer.wte.", "transformer.wpe.")
    last_stage_prefixes = ("transformer.ln_f.", "lm_head.")
    embed_weight = "transformer.wte.weight"
    # bitsandbytes replaces nn.Linear; GPT-2 uses transformers' Conv1D instead.
    supports_quantization = False

    def model_class(self) -> type[PreTrainedModel]:
        return GPT2LMHeadModel

    def num_layers(self, config: PretrainedConfig) -> int:
        return int(config.n_layer)

    def embed(self, model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        t = model.transformer
        out: torch.Tensor = t.drop(t.wte(input_ids) + t.wpe(position_ids))
        return out

    def layer_loop(self, model: Any, x: StageInputs) -> torch.Tensor:
        mask = x.causal_mask()
        hidden = x.hidden
        for block in model.transformer.h:
            hidden = first_output(block(hidden, x.cache, mask, None, use_cache=True, position_ids=x.position_ids))
        return hidden

    def head(self, model: Any, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = model.lm_head(model.transformer.ln_f(hidden)[:, -1:, :])
        return logits
