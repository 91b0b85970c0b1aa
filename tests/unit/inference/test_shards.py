"""Shard export (contents, determinism, manifest) and typed errors for bad shard sets."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors import safe_open

from dlis_market.errors import InferenceError
from dlis_market.inference.errors import (
    ContextLengthError,
    ManifestError,
    ShardError,
    ShardIntegrityError,
    StageMismatchError,
)
from dlis_market.inference.manifest import load_manifest
from dlis_market.inference.pipeline import LocalPipeline
from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import Stage
from dlis_market.types import LayerRange


@pytest.fixture
def llama_shards(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    export_shards(tiny_model_dir("llama"), out, stages=3, dtype="fp32", name="tiny-llama")
    return out


def _names(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as fh:
        return set(fh.keys())


def test_each_shard_holds_only_its_range(llama_shards: Path) -> None:
    manifest = load_manifest(llama_shards)
    assert manifest.model_name == "tiny-llama"
    # no on-chain id in the manifest: ids depend on who publishes it (namespaced by publisher)
    assert "model_id" not in json.loads((llama_shards / "manifest.json").read_text())
    assert manifest.architecture == "llama" and manifest.dtype == "fp32" and manifest.tie_word_embeddings
    assert [s.layers for s in manifest.stages] == [
        LayerRange(start=0, end=2),
        LayerRange(start=2, end=3),
        LayerRange(start=3, end=4),
    ]
    first, middle, last = (_names(llama_shards / s.file.path) for s in manifest.stages)
    assert "model.embed_tokens.weight" in first and "lm_head.weight" not in first
    assert {n.split(".")[2] for n in first if n.startswith("model.layers.")} == {"0", "1"}
    assert all(n.startswith("model.layers.2.") for n in middle)
    # Tied embeddings: the last stage carries the head weight, not the embeddings.
    assert "lm_head.weight" in last and "model.norm.weight" in last and "model.embed_tokens.weight" not in last
    for entry in [*manifest.stages]:
        assert entry.file.size == (llama_shards / entry.file.path).stat().st_size


def test_export_is_deterministic(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    for compress in (False, True):
        a, b = tmp_path / f"a{compress}", tmp_path / f"b{compress}"
        export_shards(tiny_model_dir("gemma3"), a, stages=2, dtype="bf16", compress=compress)
        export_shards(tiny_model_dir("gemma3"), b, stages=2, dtype="bf16", compress=compress)
        files = sorted(p.name for p in a.iterdir())
        assert files == sorted(p.name for p in b.iterdir())
        for name in files:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_compressed_shards_are_listed_and_load(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    steps: list[str] = []  # what `dlis model shard` shows while it works
    manifest = export_shards(tiny_model_dir("gpt2"), tmp_path / "z", stages=2, compress=True, progress=steps.append)
    assert [s.split(" (")[0].split(" ")[:3] for s in steps[1:]] == [
        ["writing", "stage", "1/2"],
        ["writing", "stage", "2/2"],
    ]
    assert steps[0].startswith("loading ")
    assert "zstd" in steps[1]
    assert all(s.compression == "zstd" and s.file.path.endswith(".zst") for s in manifest.stages)
    assert LocalPipeline.load(tmp_path / "z").generate_ids([[1, 2, 3]], 3)[0].token_ids


def test_bad_export_arguments(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="--stages 9"):
        export_shards(tiny_model_dir("llama"), tmp_path / "x", stages=9)
    with pytest.raises(ShardError, match="tile"):
        export_shards(tiny_model_dir("llama"), tmp_path / "y", ranges=[LayerRange(start=1, end=4)])
    with pytest.raises(ShardError, match="not supported for the gpt2"):
        export_shards(tiny_model_dir("gpt2"), tmp_path / "z", stages=1, dtype="nf4")


def test_sha256_mismatch_names_the_file(llama_shards: Path) -> None:
    entry = load_manifest(llama_shards).stages[1]
    path = llama_shards / entry.file.path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match=entry.file.path) as info:
        Stage.load(llama_shards, layers=entry.layers)
    assert "sha256" in str(info.value) and "re-export" in str(info.value)
    # The other stages are unaffected.
    assert Stage.load(llama_shards, index=0).layers == LayerRange(start=0, end=2)


def test_truncated_and_missing_files(llama_shards: Path) -> None:
    entry = load_manifest(llama_shards).stages[0]
    path = llama_shards / entry.file.path
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ShardIntegrityError, match="truncated"):
        Stage.load(llama_shards, index=0)
    path.unlink()
    with pytest.raises(ShardIntegrityError, match="missing"):
        Stage.load(llama_shards, index=0)


def test_corrupt_file_with_matching_manifest_is_typed(llama_shards: Path) -> None:
    """A file whose hash matches a rewritten manifest but cannot be decoded."""
    manifest = load_manifest(llama_shards)
    entry = manifest.stages[2]
    path = llama_shards / entry.file.path
    path.write_bytes(b"\x00" * entry.file.size)
    raw = json.loads((llama_shards / "manifest.json").read_text())
    import hashlib

    raw["stages"][2]["file"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (llama_shards / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ShardIntegrityError, match="cannot be decoded"):
        Stage.load(llama_shards, index=2)


def test_wrong_shard_for_stage(llama_shards: Path) -> None:
    with pytest.raises(StageMismatchError, match=r"\[0, 2\), \[2, 3\), \[3, 4\)"):
        Stage.load(llama_shards, layers=LayerRange(start=1, end=3))
    # Swap two shard files and fix their hashes in the manifest: the layer check catches it.
    raw = json.loads((llama_shards / "manifest.json").read_text())
    s1, s2 = raw["stages"][1], raw["stages"][2]
    s1["file"], s2["file"] = s2["file"], s1["file"]
    s1["tensor_names"], s2["tensor_names"] = s2["tensor_names"], s1["tensor_names"]
    (llama_shards / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(StageMismatchError, match="outside"):
        Stage.load(llama_shards, index=1)


def test_manifest_config_mismatch(llama_shards: Path) -> None:
    config_path = llama_shards / "config.json"
    config = json.loads(config_path.read_text())
    config["hidden_size"] = 64
    config_path.write_text(json.dumps(config))
    with pytest.raises(ShardIntegrityError, match=r"config\.json"):
        Stage.load(llama_shards, index=0)
    raw = json.loads((llama_shards / "manifest.json").read_text())
    raw["num_layers"] = 5
    (llama_shards / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="5 layers"):
        load_manifest(llama_shards)
    shutil.rmtree(llama_shards)
    with pytest.raises(ManifestError, match="dlis model shard"):
        load_manifest(llama_shards)


def test_prompt_longer_than_context(llama_shards: Path) -> None:
    pipe = LocalPipeline.load(llama_shards)
    with pytest.raises(ContextLengthError, match="exceeds the model context of 64") as info:
        pipe.generate_ids([list(range(60))], 10)
    assert isinstance(info.value, InferenceError)
    assert all(len(stage.sessions) == 0 for stage in pipe.stages)
