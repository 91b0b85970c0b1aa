"""fp32 pipelines are exact: greedy tokens equal transformers ``generate`` on the unsplit model and
logits agree up to fp32 summation order (``reference.fp32_logit_tolerance``) at prefill and every
decode step, for every split and every family, including batched sessions of different lengths."""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations, pairwise
from pathlib import Path

import pytest
import torch

from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.shard_export import export_shards
from dlis_market.types import LayerRange

from .reference import fp32_logit_tolerance, hf_generate, load_reference

NEW_TOKENS = 6
# Two sessions of the same length (batched in one forward pass at every step) and one shorter.
PROMPTS = [[5, 17, 3, 44, 9, 28, 60], [71, 2, 33, 8, 19, 90, 4], [12, 40, 7]]


def all_splits(num_layers: int) -> list[list[LayerRange]]:
    """Every way to cut ``[0, num_layers)`` into contiguous non-empty ranges (1..num_layers stages)."""
    splits = []
    for stages in range(1, num_layers + 1):
        for cuts in combinations(range(1, num_layers), stages - 1):
            bounds = [0, *cuts, num_layers]
            splits.append([LayerRange(start=a, end=b) for a, b in pairwise(bounds)])
    return splits


def assert_exact(pipe: LocalPipeline, reference: dict[int, tuple[list[int], list[torch.Tensor]]]) -> None:
    gens = pipe.generate_ids(PROMPTS, NEW_TOKENS, want_logits=True)
    for i, gen in enumerate(gens):
        ref_tokens, ref_logits = reference[i]
        assert gen.token_ids == ref_tokens
        assert len(gen.logits) == len(ref_logits) == NEW_TOKENS
        tolerance = fp32_logit_tolerance(pipe.config, ref_logits)
        for step, (ours, theirs) in enumerate(zip(gen.logits, ref_logits, strict=True)):
            diff = (ours - theirs).abs().max().item()
            assert diff <= tolerance, f"session {i} step {step}: logits differ by {diff} > {tolerance}"


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_every_split_matches_transformers_generate(
    family: str, tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    model_dir = tiny_model_dir(family)
    ref_model = load_reference(model_dir)
    reference = {i: hf_generate(ref_model, p, NEW_TOKENS) for i, p in enumerate(PROMPTS)}
    splits = all_splits(4)
    assert len(splits) == 8
    for n, ranges in enumerate(splits):
        out = tmp_path / f"split-{n}"
        export_shards(model_dir, out, ranges=ranges, dtype="fp32", compress=n % 2 == 1)
        pipe = LocalPipeline.load(out)
        assert [s.layers for s in pipe.stages] == ranges
        assert_exact(pipe, reference)


def test_tokens_are_not_trivial(tiny_model_dir: Callable[[str], Path]) -> None:
    """Guard against a vacuous exactness test: the tiny models produce varied tokens."""
    ref_model = load_reference(tiny_model_dir("llama"))
    tokens, _ = hf_generate(ref_model, PROMPTS[0], NEW_TOKENS)
    assert len(set(tokens)) > 1
