"""LoRA adapters applied on the fly by pipeline stages, against PEFT's own merged model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from dlis_market.inference.adapter_training import train_tiny_adapter
from dlis_market.inference.adapters import ADAPTER_WEIGHTS, adapter_sha256, load_adapter
from dlis_market.inference.errors import (
    AdapterIntegrityError,
    AdapterMismatchError,
    AdapterNotAttachedError,
    UnsupportedAdapterError,
)
from dlis_market.inference.manifest import load_manifest
from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import Stage
from dlis_market.types import LayerRange

from .reference import hf_generate, load_reference

PROMPTS = [[3, 14, 15, 92, 65], [1, 2, 3], [40, 41, 42, 43]]
NEW_TOKENS = 6
LOGIT_TOLERANCE = 1e-5  # fp32: the hook adds (alpha/r) B(A x), the merged model (W + (alpha/r) BA) x


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")  # 4 layers, hidden 32, fp32


@pytest.fixture(scope="module")
def shards(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three stages, so adapters cross two stage boundaries: [0, 1), [1, 3), [3, 4)."""
    out = tmp_path_factory.mktemp("adapter-shards") / "shards"
    ranges = [LayerRange(start=0, end=1), LayerRange(start=1, end=3), LayerRange(start=3, end=4)]
    export_shards(model_dir, out, ranges=ranges, dtype="fp32")
    return out


@pytest.fixture(scope="module")
def adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "qv"
    train_tiny_adapter(model_dir, out, r=8, target_modules=("q_proj", "v_proj"), steps=8, seed=0)
    return out


def merged_reference(model_dir: Path, adapter_dir: Path | None) -> torch.nn.Module:
    model = load_reference(model_dir)
    if adapter_dir is None:
        return model
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()  # type: ignore[no-any-return]


def assert_matches(
    gen_tokens: list[int], gen_logits: list[torch.Tensor], ref: torch.nn.Module, prompt: list[int]
) -> None:
    tokens, logits = hf_generate(ref, prompt, NEW_TOKENS)
    assert gen_tokens == tokens
    worst = max(float((a - b).abs().max()) for a, b in zip(gen_logits, logits, strict=True))
    assert worst <= LOGIT_TOLERANCE, f"logits differ by {worst:.2e}"


def test_pipelined_adapter_equals_peft_merged_model(shards: Path, model_dir: Path, adapter: Path) -> None:
    pipe = LocalPipeline.load(shards)
    adapter_id = pipe.attach_adapter(adapter, expected_sha256=adapter_sha256(adapter))
    gens = pipe.generate_ids(PROMPTS, NEW_TOKENS, want_logits=True, adapters=[adapter_id] * len(PROMPTS))
    merged = merged_reference(model_dir, adapter)
    for gen in gens:
        assert_matches(gen.token_ids, gen.logits, merged, gen.prompt_ids)
    # The adapter changes the model (trained B is not zero): the base model gives other logits.
    base_tokens, base_logits = hf_generate(merged_reference(model_dir, None), PROMPTS[0], NEW_TOKENS)
    assert float((gens[0].logits[0] - base_logits[0]).abs().max()) > 1e-2
    # Each stage holds only its own layers' tensors: q and v of 1, 2 and 1 layers.
    assert [len(s.adapters.modules_of(adapter_id)) for s in pipe.stages] == [2, 4, 2]


def test_mixed_batch_each_session_gets_its_own_model(
    shards: Path, model_dir: Path, adapter: Path, tmp_path: Path
) -> None:
    """One batched pass: a session with adapter 1, one with adapter 2, one with none."""
    other = tmp_path / "other"
    train_tiny_adapter(model_dir, other, r=4, target_modules=("q_proj", "o_proj", "down_proj"), steps=8, seed=7)
    pipe = LocalPipeline.load(shards)
    first, second = pipe.attach_adapter(adapter), pipe.attach_adapter(other)
    assert first != second
    gens = pipe.generate_ids(PROMPTS, NEW_TOKENS, want_logits=True, adapters=[first, None, second])
    refs = [merged_reference(model_dir, adapter), merged_reference(model_dir, None), merged_reference(model_dir, other)]
    for gen, ref in zip(gens, refs, strict=True):
        assert_matches(gen.token_ids, gen.logits, ref, gen.prompt_ids)
    # (PROMPTS differ in length: sessions at different positions shared the decode passes above.)
    # Detaching one adapter leaves the other (re-packed into smaller banks) serving the same model.
    assert all(stage.adapters.detach(second) for stage in pipe.stages)
    again = pipe.generate_ids([PROMPTS[0], PROMPTS[1]], NEW_TOKENS, want_logits=True, adapters=[first, None])
    for gen, ref in zip(again, refs, strict=False):
        assert_matches(gen.token_ids, gen.logits, ref, gen.prompt_ids)
    with pytest.raises(AdapterNotAttachedError, match="not attached"):
        pipe.generate_ids([PROMPTS[2]], NEW_TOKENS, adapters=[second])


def test_layers_to_transform_across_stage_boundaries(shards: Path, model_dir: Path, tmp_path: Path) -> None:
    """An adapter on layers 1 and 3 only: stage [0, 1) holds nothing, [1, 3) layer 1, [3, 4) layer 3."""
    partial = tmp_path / "partial"
    train_tiny_adapter(model_dir, partial, layers_to_transform=[1, 3], steps=8, seed=3)
    manifest = load_manifest(shards)
    full = load_adapter(partial, manifest)
    assert full.layer_indices == [1, 3]
    stages = [Stage.load(shards, index=i) for i in range(3)]
    for stage in stages:
        stage.adapters.attach(load_adapter(partial, manifest, layers=stage.layers))
    assert [len(s.adapters.modules_of(full.sha256)) for s in stages] == [0, 2, 2]
    gen = LocalPipeline(stages).generate_ids([PROMPTS[0]], NEW_TOKENS, want_logits=True, adapters=[full.sha256])[0]
    assert_matches(gen.token_ids, gen.logits, merged_reference(model_dir, partial), PROMPTS[0])
    # A stage refuses an adapter loaded for other layers than its own.
    with pytest.raises(AdapterMismatchError, match=r"load it with layers=\[1, 3\)"):
        stages[1].adapters.attach(load_adapter(partial, manifest, layers=LayerRange(start=3, end=4)))


def test_rslora_scaling_follows_peft(shards: Path, model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    """use_rslora scales by alpha / sqrt(r), not alpha / r: PEFT's merged model is the judge."""
    rs = tmp_path / "rslora"
    shutil.copytree(adapter, rs)
    config = json.loads((rs / "adapter_config.json").read_text())
    (rs / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    pipe = LocalPipeline.load(shards)
    plain, scaled = pipe.attach_adapter(adapter), pipe.attach_adapter(rs)
    gens = pipe.generate_ids([PROMPTS[0]] * 2, NEW_TOKENS, want_logits=True, adapters=[scaled, plain])
    assert_matches(gens[0].token_ids, gens[0].logits, merged_reference(model_dir, rs), PROMPTS[0])
    assert float((gens[0].logits[0] - gens[1].logits[0]).abs().max()) > 1e-2


def test_tampered_adapter_is_refused(shards: Path, adapter: Path, tmp_path: Path) -> None:
    manifest = load_manifest(shards)
    good = adapter_sha256(adapter)
    copy = tmp_path / "tampered"
    shutil.copytree(adapter, copy)
    weights = bytearray((copy / ADAPTER_WEIGHTS).read_bytes())
    weights[-1] ^= 0x01  # one bit of the last tensor value
    (copy / ADAPTER_WEIGHTS).write_bytes(bytes(weights))
    with pytest.raises(AdapterIntegrityError, match=f"not the {good}"):
        load_adapter(copy, manifest, expected_sha256=good)
    (copy / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(AdapterIntegrityError, match="missing"):
        load_adapter(copy, manifest)


def test_adapter_for_another_base_shape_is_refused(
    shards: Path, adapter: Path, tmp_path: Path, tiny_model_dir: Callable[[str], Path]
) -> None:
    # The same architecture, another width: q_proj is 32x32 here, 48x48 there.
    from transformers import AutoModelForCausalLM, LlamaConfig

    wide_dir = tmp_path / "wide"
    wide = LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(wide).save_pretrained(wide_dir)
    export_shards(wide_dir, tmp_path / "wide-shards", stages=1, dtype="fp32")
    with pytest.raises(AdapterMismatchError, match=r"lora_A \[8, 32\].*needs \[8, 48\]"):
        load_adapter(adapter, load_manifest(tmp_path / "wide-shards"))
    # Another architecture: GPT-2 has no q_proj/v_proj modules.
    export_shards(tiny_model_dir("gpt2"), tmp_path / "gpt2-shards", stages=1, dtype="fp32")
    with pytest.raises(AdapterMismatchError, match=r"no module model\.layers\.0\.self_attn\.q_proj"):
        load_adapter(adapter, load_manifest(tmp_path / "gpt2-shards"))
    # An adapter for a deeper model of the same width: layer 5 does not exist in a 4-layer base.
    deep = tmp_path / "deep"
    shutil.copytree(adapter, deep)
    tensors = load_file(deep / ADAPTER_WEIGHTS)
    save_file({k.replace("layers.3.", "layers.5."): v for k, v in tensors.items()}, deep / ADAPTER_WEIGHTS)
    with pytest.raises(AdapterMismatchError, match=r"layer 5, but the base has layers 0\.\.3"):
        load_adapter(deep, load_manifest(shards))
    # A PEFT feature a hook cannot apply is named, not silently ignored.
    config = json.loads((adapter / "adapter_config.json").read_text())
    (deep / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UnsupportedAdapterError, match="use_dora=True"):
        load_adapter(deep, load_manifest(shards))
    # A regex for target_modules (catastrophic backtracking, from a stranger's file) is refused unrun.
    (deep / "adapter_config.json").write_text(json.dumps({**config, "target_modules": "(a+)+$"}))
    with pytest.raises(UnsupportedAdapterError, match="target_modules is a regex"):
        load_adapter(deep, load_manifest(shards))


def test_sessions_need_an_attached_adapter(shards: Path, adapter: Path) -> None:
    stage = Stage.load(shards, index=1)
    adapter_id = adapter_sha256(adapter)
    with pytest.raises(AdapterNotAttachedError, match="attach it before opening"):
        stage.open_session("s", 16, adapter=adapter_id)
    assert len(stage.sessions) == 0  # nothing opened
    stage.adapters.attach(load_adapter(adapter, stage.manifest, layers=stage.layers))
    stage.open_session("s", 16, adapter=adapter_id)
    assert sum(len(m._forward_hooks) for m in stage.model.modules()) == 4  # q and v of its 2 layers
    assert stage.adapters.detach(adapter_id)
    assert not any(m._forward_hooks for m in stage.model.modules())  # no adapter: no hooks, as before


def with_word_tokenizer(shards: Path, out: Path, vocab_size: int) -> Path:
    """A copy of ``shards`` with a word-level tokenizer over the tiny model's vocabulary (w0 w1 ...)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    shutil.copytree(shards, out)
    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def test_model_generate_cli_applies_the_adapter(shards: Path, model_dir: Path, adapter: Path, tmp_path: Path) -> None:
    """`dlis model generate --adapter DIR` answers as PEFT's merged model does, not as the base."""
    from typer.testing import CliRunner

    from dlis_market.cli.main import app

    vocab = int(load_manifest(shards).config["vocab_size"])
    folder = with_word_tokenizer(shards, tmp_path / "with-tokenizer", vocab)

    def run(*extra: str) -> dict[str, object]:
        args = ["model", "generate", str(folder), "--prompt", "w3 w14 w15 w9", "--max-tokens", "4", "--greedy",
                "--json", *extra]  # fmt: skip
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 0, out.output
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    plain, tuned = run(), run("--adapter", str(adapter))
    assert plain["adapter"] is None and tuned["adapter"] == adapter_sha256(adapter)
    prompt = tuned["prompt_ids"]
    assert prompt == [3, 14, 15, 9]
    assert tuned["token_ids"] != plain["token_ids"]  # the adapter changes the answer
    assert tuned["token_ids"] == hf_generate(merged_reference(model_dir, adapter), prompt, 4)[0]
    assert plain["token_ids"] == hf_generate(merged_reference(model_dir, None), prompt, 4)[0]
