"""The shard manifest: what a set of layer-range shards holds, and how to check it on disk.

``manifest.json`` sits next to the shard files. It names the model (its on-chain id is
``types.model_id(name, publisher)``: ids are namespaced by whoever publishes it), its family and
full HF config, the dtype/quantization, every layer range and the size + sha256 of every file
(shards, config, tokenizer). A stage verifies the files it needs against it before it builds
anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from dlis_market.inference.errors import ManifestError, ShardIntegrityError, StageMismatchError
from dlis_market.types import LayerRange

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Files a shard folder carries besides the shards, copied from the model folder when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2  # 2: no model_id (ids are namespaced by publisher on chain)
ShardDtype = Literal["fp32", "bf16", "int8", "nf4"]
Compression = Literal["none", "zstd"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Frozen):
    """One file of the shard set, relative to the manifest's folder."""

    path: str
    size: int
    sha256: str


class StageEntry(_Frozen):
    """One stage: its layer range and the shard file holding exactly its tensors."""

    index: int
    layers: LayerRange
    file: FileEntry
    compression: Compression
    has_embeddings: bool
    has_head: bool
    tensor_names: list[str]


class Manifest(_Frozen):
    """Everything a stage needs to know about the shard set before loading its own file."""

    format_version: int = MANIFEST_VERSION
    model_name: str
    architecture: str
    model_type: str
    num_layers: int
    dtype: ShardDtype
    quantization: str | None
    tie_word_embeddings: bool
    config: dict[str, Any]
    config_file: FileEntry
    tokenizer_files: list[FileEntry]
    stages: list[StageEntry]

    def stage_for(self, layers: LayerRange) -> StageEntry:
        for stage in self.stages:
            if stage.layers == layers:
                return stage
        have = ", ".join(str(s.layers) for s in self.stages)
        raise StageMismatchError(
            f"no shard for layers {layers} in {self.model_name!r} (shards cover {have}); "
            "ask for one of those ranges or re-export with a plan that has this range"
        )

    def dumps(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, path: Path) -> FileEntry:
    return FileEntry(path=path.relative_to(root).as_posix(), size=path.stat().st_size, sha256=sha256_file(path))


def check_size(root: Path, entry: FileEntry) -> Path:
    """The listed file's path once it exists with the manifest's size; a typed error naming the
    file and the fix otherwise (the cheap check before any hashing)."""
    path = root / entry.path
    if not path.is_file():
        raise ShardIntegrityError(f"{path} is missing; re-export the shards or fetch them again")
    size = path.stat().st_size
    if size != entry.size:
        raise ShardIntegrityError(
            f"{path} is {size} bytes but the manifest says {entry.size} (truncated or replaced); "
            "delete it and re-export or fetch it again"
        )
    return path


def check_digest(path: Path, digest: str, entry: FileEntry) -> None:
    """Refuse a file whose sha256 (hex) is not the manifest's."""
    if digest != entry.sha256:
        raise ShardIntegrityError(
            f"{path} has sha256 {digest} but the manifest says {entry.sha256} (corrupt or not this "
            "model's file); delete it and re-export or fetch it again"
        )


def verify_file(root: Path, entry: FileEntry) -> Path:
    """Check size then sha256 of one listed file; a typed error naming the file and the fix."""
    path = check_size(root, entry)
    check_digest(path, sha256_file(path), entry)
    return path


def load_manifest(shard_dir: Path) -> Manifest:
    """Read and cross-check ``manifest.json``: format, layer coverage, config file agreement."""
    path = shard_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} not found; point at a folder made by `dlis model shard`")
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except (ValidationError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not a valid shard manifest ({exc}); re-export the shards") from exc
    if manifest.format_version != MANIFEST_VERSION:
        raise ManifestError(
            f"{path} has format_version {manifest.format_version}, this build reads {MANIFEST_VERSION}; "
            "re-export the shards with this version of dlis"
        )
    expected_start = 0
    for i, stage in enumerate(manifest.stages):
        if stage.index != i or stage.layers.start != expected_start:
            raise ManifestError(
                f"{path}: stage {i} covers {stage.layers}, expected to start at layer {expected_start}; "
                "the ranges must tile [0, num_layers) in order. Re-export the shards"
            )
        expected_start = stage.layers.end
    if expected_start != manifest.num_layers:
        raise ManifestError(
            f"{path}: stages cover [0, {expected_start}) but the model has {manifest.num_layers} layers; "
            "re-export the shards"
        )
    config_path = verify_file(shard_dir, manifest.config_file)
    on_disk = json.loads(config_path.read_text())
    if on_disk != manifest.config:
        raise ManifestError(
            f"{config_path} differs from the config recorded in {path}; the folder mixes two exports. "
            "Re-export the shards into an empty folder"
        )
    return manifest


def config_from_manifest(manifest: Manifest) -> PretrainedConfig:
    """The transformers config the shards were exported from (imports transformers)."""
    from transformers import CONFIG_MAPPING

    try:
        config = CONFIG_MAPPING[manifest.model_type].from_dict(dict(manifest.config))
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(
            f"config for model_type {manifest.model_type!r} in the manifest cannot be built ({exc}); "
            "re-export the shards"
        ) from exc
    return config
