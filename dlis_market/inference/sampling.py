"""Next-token choice at the last stage: greedy, temperature, top-k, top-p, seeded; OpenAI's
logit bias and presence/frequency penalties; log probabilities of the chosen token.

Each session owns a ``torch.Generator`` seeded from its ``SamplingParams.seed``, so the same
prompt, params and seed give the same tokens whatever else is batched alongside it. Penalties
count the tokens the session generated so far (``history``), as OpenAI and vLLM do: the prompt's
tokens are not penalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TOP_LOGPROBS = 20  # as OpenAI
# Sampling features beyond greedy/temperature/top-k/top-p/seed that a last stage may support; a
# worker names those it supports when it opens a session (``node.protocol.OpenAnswer``).
FEATURES = frozenset({"penalties", "logit_bias", "logprobs"})


class SamplingParams(BaseModel):
    """How the last stage picks tokens for one session. ``greedy`` ignores the rest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    greedy: bool = True
    temperature: float = Field(default=1.0, gt=0.0)
    top_k: int = Field(default=0, ge=0)  # 0: no top-k cut
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = 0
    # OpenAI's penalties: logit - frequency_penalty x count - presence_penalty x (count > 0), with
    # count the token's occurrences among the tokens generated so far. Greedy choice sees them too.
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # (token id, bias in [-100, 100]) added to the token's logit before anything else.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Log probabilities to return with each token: None none, 0 the chosen token's, k also the k
    # most likely tokens' (of the model's raw distribution: log_softmax of the logits before logit
    # bias, penalties, temperature, top-k and top-p, as vLLM's default ``raw_logprobs``).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
        for token, bias in value:
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(
                    f"logit_bias entry {token}: {bias} must have a token id >= 0 and a bias in [-100, 100]"
                )
        return value

    @property
    def adjusts(self) -> bool:
        """Whether bias or penalties change the logits at all."""
        return bool(self.logit_bias) or self.penalises

    @property
    def penalises(self) -> bool:
        """Whether presence or frequency penalties apply (the stage then keeps the session's tokens)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def features(self) -> frozenset[str]:
        """What of :data:`FEATURES` these params need from the last stage beyond plain sampling: a
        worker that does not say it supports them must not serve the session."""
        need = set()
        if self.penalises:
            need.add("penalties")
        if self.logit_bias:
            need.add("logit_bias")
        if self.logprobs is not None:
            need.add("logprobs")
        return frozenset(need)

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


def adjust_logits(logits: torch.Tensor, params: SamplingParams, history: Sequence[int] = ()) -> torch.Tensor:
    """Logit bias, then presence and frequency penalties over ``history`` (the tokens generated so
    far), on one row of logits ``[V]``; the row itself when nothing applies. Token ids outside the
    vocabulary are refused (ValueError): a bias for them would silently do nothing."""
    if not params.adjusts:
        return logits
    vocab = logits.shape[-1]
    scores = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long)
        if int(ids.max()) >= vocab:
            raise ValueError(f"logit_bias names token {int(ids.max())}, outside the vocabulary of {vocab} tokens")
        scores.index_add_(0, ids, torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32))
    if history and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(list(history), dtype=torch.long), minlength=vocab)[:vocab].float()
        scores -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return scores


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, history: Sequence[int] = ()
) -> int:
    """One token id from a row of logits ``[V]``; ``history``: the tokens generated so far (for
    the penalties)."""
    logits = adjust_logits(logits, params, history)
    if params.greedy:
        return int(torch.argmax(logits).item())
    probs = filter_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log probability and the ``top`` most likely tokens' (id, log probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def sample_with_logprob(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, history: Sequence[int] = ()
) -> tuple[int, TokenLogprob | None]:
    """:func:`sample_next`, and the token's :func:`token_logprob` when ``params.logprobs`` asks for
    it (computed only then: no cost otherwise)."""
    token = sample_next(logits, params, generator, history)
    if params.logprobs is None:
        return token, None
    return token, token_logprob(logits, token, params.logprobs)


def token_logprob(logits: torch.Tensor, token: int, top: int = 0) -> TokenLogprob:
    """Log probabilities of one row of logits ``[V]`` (the model's distribution, before
    temperature and penalties, as vLLM returns them): the chosen ``token``'s and the ``top`` best."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logp, min(top, logp.shape[-1]))
        best = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logp[token]), best)
