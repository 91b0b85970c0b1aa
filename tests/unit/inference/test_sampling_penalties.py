"""OpenAI's logit bias and presence/frequency penalties, and token log probabilities, at the
sampler (``inference.sampling``): OpenAI's documented formula, greedy and sampled, seeded."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from dlis_market.inference.sampling import SamplingParams, adjust_logits, sample_next, token_logprob

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5])


def test_defaults_change_nothing_and_old_fields_still_build() -> None:
    old = SamplingParams(greedy=False, temperature=0.7, top_k=3, top_p=0.9, seed=5)
    assert not old.adjusts and adjust_logits(LOGITS, old, [1, 1, 2]) is LOGITS
    a, b = old.generator(), old.generator()
    assert [sample_next(LOGITS, old, a) for _ in range(20)] == [sample_next(LOGITS, old, b) for _ in range(20)]


def test_openai_penalty_formula_over_generated_tokens() -> None:
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = adjust_logits(LOGITS, p, [1, 1, 1, 2])
    # logit - count x frequency - (count > 0) x presence
    assert got.tolist() == pytest.approx([1.0, 3.0 - 0.75 - 0.5, 2.0 - 0.25 - 0.5, 0.5])
    assert torch.equal(adjust_logits(LOGITS, p, []), LOGITS)  # nothing generated yet: no penalty


def test_penalties_change_the_greedy_choice() -> None:
    assert sample_next(LOGITS, SamplingParams(), None, history=[1, 1]) == 1
    repeat_averse = SamplingParams(frequency_penalty=1.0)
    assert sample_next(LOGITS, repeat_averse, None, history=[1, 1]) == 2  # 3 - 2 < 2
    assert sample_next(LOGITS, SamplingParams(presence_penalty=-2.0), None, history=[3]) == 1  # 0.5 + 2 < 3
    assert sample_next(LOGITS, SamplingParams(presence_penalty=-2.0), None, history=[2]) == 2  # 2 + 2 > 3


def test_logit_bias_forces_and_bans_tokens_when_sampling() -> None:
    forced = SamplingParams(greedy=False, seed=1, logit_bias=((3, 100.0),))
    gen = forced.generator()
    assert {sample_next(LOGITS, forced, gen) for _ in range(50)} == {3}
    banned = SamplingParams(greedy=False, seed=1, logit_bias=((1, -100.0), (2, -100.0)))
    gen = banned.generator()
    assert {sample_next(LOGITS, banned, gen) for _ in range(200)} <= {0, 3}
    with pytest.raises(ValueError, match="outside the vocabulary of 4"):
        adjust_logits(LOGITS, SamplingParams(logit_bias=((4, 1.0),)))


@pytest.mark.parametrize(
    "bad",
    [{"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"logit_bias": ((1, 101.0),)}, {"logit_bias": ((-1, 1.0),)},
     {"logprobs": 21}],
)  # fmt: skip
def test_out_of_range_values_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        SamplingParams(**bad)


def test_token_logprob_and_top_alternatives() -> None:
    lp = token_logprob(LOGITS, 2, top=2)
    norm = math.log(sum(math.exp(x) for x in LOGITS.tolist()))
    assert lp.token == 2 and lp.logprob == pytest.approx(2.0 - norm)
    assert [t for t, _ in lp.top] == [1, 2] and lp.top[0][1] == pytest.approx(3.0 - norm)
    assert token_logprob(LOGITS, 0).top == ()
    assert sum(math.exp(v) for _, v in token_logprob(LOGITS, 0, top=10).top) == pytest.approx(1.0)
