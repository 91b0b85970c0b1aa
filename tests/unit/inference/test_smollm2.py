"""The real SmolLM2-135M-Instruct weights: the pipeline reproduces transformers ``generate``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.shard_export import export_shards

from .reference import fp32_logit_tolerance, hf_generate, load_reference

NEW_TOKENS = 8


def test_import_gives_a_plain_hf_folder(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert (smollm2_dir / "tokenizer.json").is_file()


@pytest.mark.parametrize("stages", [1, 3])
def test_greedy_tokens_equal_hf_generate(smollm2_dir: Path, tmp_path: Path, stages: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer("The capital of France is")["input_ids"]
    ref_tokens, ref_logits = hf_generate(load_reference(smollm2_dir), prompt, NEW_TOKENS)

    export_shards(smollm2_dir, tmp_path / "shards", stages=stages, dtype="fp32")
    pipe = LocalPipeline.load(tmp_path / "shards")
    gen = pipe.generate_ids([prompt], NEW_TOKENS, want_logits=True)[0]

    assert gen.token_ids == ref_tokens
    tolerance = fp32_logit_tolerance(pipe.config, ref_logits)
    for ours, theirs in zip(gen.logits, ref_logits, strict=True):
        assert (ours - theirs).abs().max().item() <= tolerance
    assert "Paris" in tokenizer.decode(gen.token_ids)
