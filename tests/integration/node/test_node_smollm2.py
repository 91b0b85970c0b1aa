"""Headline: SmolLM2-135M (real weights) served by 3 workers in 3 processes gives transformers' tokens."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
import torch
from node_helpers import Swarm, driver_settings, wait_for_spans  # type: ignore[import-not-found]
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlis_market.inference.importer import import_model
from dlis_market.inference.shard_export import export_shards
from dlis_market.node.driver import JobSpec, PipelineDriver

# Same cache as the inference tests' ``smollm2_dir`` fixture, so the import happens once per machine.
SMOLLM2_CACHE = Path(tempfile.gettempdir()) / "dlis-test-cache" / "v1"
NEW_TOKENS = 10


@pytest.mark.heavy
def test_smollm2_greedy_through_three_workers_equals_transformers(tmp_path: Path) -> None:
    model_dir = import_model("smollm2-135m", SMOLLM2_CACHE / "models", SMOLLM2_CACHE / "cache")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = list(tokenizer("The capital of France is")["input_ids"])
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = [int(t) for t in out[0, len(prompt) :]]
    del reference

    manifest = export_shards(model_dir, tmp_path / "shards", stages=3, dtype="fp32")
    ranges = [f"{s.layers.start}:{s.layers.end}" for s in manifest.stages]

    async def run(initial_peers: list[str]) -> list[int]:
        driver = await PipelineDriver.create(initial_peers, driver_settings())
        try:
            await wait_for_spans(driver, manifest.model_name, 3)
            tokens, receipts = await driver.generate(
                JobSpec(model=manifest.model_name, prompt_ids=prompt, max_new_tokens=NEW_TOKENS)
            )
            assert len(receipts) == 3
            return tokens
        finally:
            await driver.close()

    with Swarm(tmp_path / "swarm") as swarm:
        swarm.start_workers([(tmp_path / "shards", r, f"w{i}") for i, r in enumerate(ranges)])
        tokens = asyncio.run(run(swarm.initial_peers))
    assert tokens == expected
    assert "Paris" in tokenizer.decode(tokens)
