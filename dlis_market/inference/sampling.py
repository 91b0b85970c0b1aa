"""Next-token choice at the last stage: greedy, temperature, top-k, top-p, seeded.

Each session owns a ``torch.Generator`` seeded from its ``SamplingParams.seed``, so the same
prompt, params and seed give the same tokens whatever else is batched alongside it.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """How the last stage picks tokens for one session. ``greedy`` ignores the rest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    greedy: bool = True
    temperature: float = Field(default=1.0, gt=0.0)
    top_k: int = Field(default=0, ge=0)  # 0: no top-k cut
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0

    def generator(self) -> torch.Generator:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(self.seed)
        return gen


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on one row of logits ``[V]``; returns fp32."""
    scores = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # Drop tokens once the mass before them already reaches top_p; always keep the best one.
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= params.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a row of logits ``[V]``."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    probs = filter_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
