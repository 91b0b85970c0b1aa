"""What the shard store needs from a shard manifest: the list of files with size and sha256.

The manifest itself belongs to the inference exporter (``manifest.json`` in a shard folder);
this module reads it leniently so the store does not depend on its exact schema: every JSON
object anywhere in it that has ``path`` (a relative path inside the shard folder), ``size``
(bytes, int) and ``sha256`` (64 hex digits) is one file, whether listed in a top-level
``"files"`` list or nested per stage. The layer count for on-chain registration is read from
``num_layers`` or ``num_hidden_layers`` at the top level or under ``model``/``config``, if there.
Layer-range stages, when the manifest has them, are read from a top-level ``"stages"`` list of
``{"layers": {"start", "end"}, "file": {"path", ...}}`` objects (the exporter's format), so a worker
can fetch only the shards of the layers it serves (:func:`files_for_layers`).
The manifest's bytes are never rewritten: its sha256 is what the chain records.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from dlis_market.storage.errors import LayerSelectionError, ManifestError
from dlis_market.types import LayerRange

MANIFEST_NAME = "manifest.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ManifestFile:
    path: str  # POSIX, relative to the shard folder
    size: int
    sha256: str


@dataclass(frozen=True)
class ManifestStage:
    layers: LayerRange
    path: str  # the shard file holding exactly these layers


@dataclass(frozen=True)
class ManifestFiles:
    files: tuple[ManifestFile, ...]
    sha256: str  # of the manifest's bytes
    num_layers: int | None
    model_name: str | None = None  # top-level "model_name", if there (its on-chain id depends on the publisher)
    stages: tuple[ManifestStage, ...] = ()

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def safe_relative_path(path: str) -> str:
    """``path`` if it is a plain relative POSIX path inside a folder, else ManifestError."""
    pure = PurePosixPath(path)
    if (
        not path
        or "\\" in path
        or "\x00" in path
        or pure.is_absolute()
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise ManifestError(f"file path {path!r} must be relative, inside the shard folder, without '..'")
    return path


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while block := src.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_range(path: Path, start: int, end: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of ``path`` from ``start`` to ``end`` (or to where the file ends first), in chunks
    of at most ``chunk`` bytes."""
    with path.open("rb") as src:
        src.seek(start)
        left = end - start
        while left > 0 and (block := src.read(min(chunk, left))):
            left -= len(block)
            yield block


def _entries(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if {"path", "size", "sha256"} <= node.keys():
            yield node
        for value in node.values():
            yield from _entries(value)
    elif isinstance(node, list):
        for value in node:
            yield from _entries(value)


def _num_layers(doc: dict[str, Any]) -> int | None:
    for scope in (doc, doc.get("model"), doc.get("config")):
        if isinstance(scope, dict):
            for key in ("num_layers", "num_hidden_layers"):
                value = scope.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return None


def _stages(doc: dict[str, Any], files: dict[str, ManifestFile]) -> tuple[ManifestStage, ...]:
    """Entries of a top-level ``stages`` list shaped ``{"layers": {...}, "file": {...}}``; others are
    ignored (lenient, as for files). One of that shape that names an unlisted file or a bad range
    is refused: it would select the wrong shard."""
    raw = doc.get("stages")
    stages: list[ManifestStage] = []
    for entry in raw if isinstance(raw, list) else []:
        if not (
            isinstance(entry, dict) and isinstance(entry.get("layers"), dict) and isinstance(entry.get("file"), dict)
        ):
            continue
        path, start, end = entry["file"].get("path"), entry["layers"].get("start"), entry["layers"].get("end")
        if not isinstance(path, str) or path not in files:
            raise ManifestError(
                f"{MANIFEST_NAME} has a stage whose file {path!r} it does not list; re-export the shards"
            )
        if not (isinstance(start, int) and isinstance(end, int)) or isinstance(start, bool) or isinstance(end, bool):
            raise ManifestError(f"{MANIFEST_NAME} stage of {path!r} has layers {start!r}..{end!r}; need integers")
        try:
            stages.append(ManifestStage(LayerRange(start=start, end=end), path))
        except ValueError as exc:
            raise ManifestError(f"{MANIFEST_NAME} stage of {path!r} has a bad layer range ({exc})") from exc
    return tuple(stages)


def files_for_layers(manifest: ManifestFiles, layers: LayerRange) -> frozenset[str]:
    """Paths a stage serving ``layers`` needs: every stage file whose range overlaps ``layers``,
    plus every file that belongs to no stage (config, tokenizer)."""
    if not manifest.stages:
        raise LayerSelectionError(
            f"{MANIFEST_NAME} names no layer-range stages, so layers {layers} cannot be selected; "
            "fetch the whole model (without --layers)"
        )
    num_layers = manifest.num_layers or max(s.layers.end for s in manifest.stages)
    have = ", ".join(str(s.layers) for s in manifest.stages)
    chosen = {s.path for s in manifest.stages if s.layers.start < layers.end and layers.start < s.layers.end}
    if layers.end > num_layers or not chosen:
        raise LayerSelectionError(
            f"layers {layers} are not all in this model: it has {num_layers} layers in stages {have}; "
            f"ask for a range inside [0, {num_layers})"
        )
    in_stages = {s.path for s in manifest.stages}
    return frozenset(chosen | {f.path for f in manifest.files if f.path not in in_stages})


def parse_manifest(data: bytes) -> ManifestFiles:
    """Read the file list out of ``manifest.json`` bytes; ManifestError if it has none or lies."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"{MANIFEST_NAME} is not valid JSON ({exc}); re-export the shards") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"{MANIFEST_NAME} must be a JSON object, got {type(doc).__name__}")
    files: dict[str, ManifestFile] = {}
    for entry in _entries(doc):
        path, size, digest = entry["path"], entry["size"], entry["sha256"]
        if not isinstance(path, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"manifest file entry {entry!r} needs a string path and a size >= 0")
        if not isinstance(digest, str) or not _SHA256.match(digest.lower()):
            raise ManifestError(f"manifest file {path!r} has sha256 {digest!r}; need 64 hex digits")
        item = ManifestFile(safe_relative_path(path), size, digest.lower())
        if path == MANIFEST_NAME:
            raise ManifestError(f"the manifest cannot list itself ({MANIFEST_NAME})")
        if files.setdefault(path, item) != item:
            raise ManifestError(f"manifest lists {path!r} twice with different size or sha256")
    if not files:
        raise ManifestError(
            f"{MANIFEST_NAME} lists no files: need objects with path, size and sha256 (e.g. a 'files' list)"
        )
    model_name = doc.get("model_name")
    return ManifestFiles(
        tuple(files.values()),
        sha256_hex(data),
        _num_layers(doc),
        model_name if isinstance(model_name, str) else None,
        _stages(doc, files),
    )
