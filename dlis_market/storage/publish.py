"""Publish a shard folder: add and pin every file and the manifest, then the publication index.

See :mod:`dlis_market.storage.publication` for what is stored and why. The CID printed as
"manifest CID" is the index's CID; together with the manifest's sha256 it is what the chain
registers (through the ``register`` hook, so this package does not import the chain bindings).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from dlis_market.storage.client import KuboClient
from dlis_market.storage.errors import ManifestError, ShardIntegrityError
from dlis_market.storage.manifest_files import MANIFEST_NAME, ManifestFile, parse_manifest
from dlis_market.storage.publication import PartRef, Publication, PublishedFile
from dlis_market.types import Cid

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 32 << 20

# (bytes added so far, total bytes)
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class ModelRegistration:
    """What the chain's NodeRegistry records for a published model."""

    manifest_cid: Cid  # the publication index CID
    manifest_sha256: str  # sha256 of manifest.json's bytes
    num_layers: int | None
    model_name: str | None = None  # from the manifest; published in the publisher's namespace


RegisterHook = Callable[[ModelRegistration], Awaitable[None] | None]


@dataclass(frozen=True)
class PublishResult:
    manifest_cid: Cid  # publication index CID: give this to fetchers / the chain
    manifest_sha256: str
    manifest_file_cid: Cid  # CID of manifest.json itself
    num_layers: int | None
    publication: Publication
    total_bytes: int
    model_name: str | None = None

    def registration(self) -> ModelRegistration:
        return ModelRegistration(self.manifest_cid, self.manifest_sha256, self.num_layers, self.model_name)


def part_ranges(size: int, part_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each part; an empty file is one empty part."""
    if part_size <= 0:
        raise ValueError(f"part size must be > 0 bytes, got {part_size}")
    if size == 0:
        return [(0, 0)]
    return [(off, min(part_size, size - off)) for off in range(0, size, part_size)]


def hash_parts(path: Path, part_size: int, chunk: int = 1 << 20) -> tuple[str, int, list[str]]:
    """sha256 and size of the file, and the sha256 of each of its parts, in one read."""
    whole = hashlib.sha256()
    parts: list[str] = []
    size = 0
    with path.open("rb") as src:
        while True:
            part = hashlib.sha256()
            left = part_size
            while left and (block := src.read(min(chunk, left))):
                whole.update(block)
                part.update(block)
                left -= len(block)
            got = part_size - left
            size += got
            if got == 0 and parts:
                break
            parts.append(part.hexdigest())
            if got < part_size:
                break
    return whole.hexdigest(), size, parts


async def _check_file(shard_dir: Path, entry: ManifestFile, part_size: int) -> tuple[Path, list[str]]:
    """The file's path and its parts' sha256, once its size and sha256 match the manifest."""
    path = shard_dir / entry.path
    if not await asyncio.to_thread(path.is_file):
        raise ManifestError(f"{MANIFEST_NAME} lists {entry.path} but {path} does not exist")
    size = (await asyncio.to_thread(path.stat)).st_size
    if size != entry.size:
        raise ShardIntegrityError(f"{path} has {size} bytes, the manifest says {entry.size}; re-export the shards")
    digest, size, part_hashes = await asyncio.to_thread(hash_parts, path, part_size)
    if digest != entry.sha256 or size != entry.size:
        raise ShardIntegrityError(f"{path} has sha256 {digest}, the manifest says {entry.sha256}; re-export the shards")
    return path, part_hashes


async def _add_parts(
    client: KuboClient,
    path: Path,
    rel: str,
    entry_size: int,
    part_size: int,
    part_hashes: list[str],
    done: Callable[[int], None],
) -> tuple[PartRef, ...]:
    ranges = part_ranges(entry_size, part_size)
    if len(ranges) != len(part_hashes):
        raise ShardIntegrityError(f"{path} changed while being published ({len(part_hashes)} parts hashed); retry")
    parts = []
    for i, ((offset, length), sha256) in enumerate(zip(ranges, part_hashes, strict=True)):
        added = await client.add_file(path, offset=offset, length=length, name=f"{rel}.part{i}", pin=True)
        parts.append(PartRef(cid=added.cid, size=length, sha256=sha256))
        done(length)
    return tuple(parts)


async def publish_model(
    client: KuboClient,
    shard_dir: Path,
    *,
    part_size: int = DEFAULT_PART_SIZE,
    register: RegisterHook | None = None,
    progress: ProgressCallback | None = None,
) -> PublishResult:
    """Verify the folder against its manifest, add+pin everything, add+pin the index, register."""
    manifest_path = shard_dir / MANIFEST_NAME
    try:
        manifest_bytes = await asyncio.to_thread(manifest_path.read_bytes)
    except FileNotFoundError:
        raise ManifestError(f"{shard_dir} has no {MANIFEST_NAME}; export the shards first") from None
    manifest = parse_manifest(manifest_bytes)
    total = manifest.total_size + len(manifest_bytes)
    sent = 0

    def done(n: int) -> None:
        nonlocal sent
        sent += n
        if progress is not None:
            progress(sent, total)

    files = []
    for entry in manifest.files:
        path, part_hashes = await _check_file(shard_dir, entry, part_size)
        parts = await _add_parts(client, path, entry.path, entry.size, part_size, part_hashes, done)
        files.append(PublishedFile(path=entry.path, size=entry.size, sha256=entry.sha256, parts=parts))
        log.info("added %s (%d bytes, %d parts)", entry.path, entry.size, len(parts))
    manifest_hashes = [
        hashlib.sha256(manifest_bytes[off : off + n]).hexdigest()
        for off, n in part_ranges(len(manifest_bytes), part_size)
    ]
    manifest_parts = await _add_parts(
        client, manifest_path, MANIFEST_NAME, len(manifest_bytes), part_size, manifest_hashes, done
    )
    publication = Publication(
        manifest=PublishedFile(
            path=MANIFEST_NAME, size=len(manifest_bytes), sha256=manifest.sha256, parts=manifest_parts
        ),
        files=tuple(files),
    )
    index_cid = await _add_bytes(client, publication.to_bytes(), "publication.json")
    result = PublishResult(
        manifest_cid=index_cid,
        manifest_sha256=manifest.sha256,
        manifest_file_cid=Cid(manifest_parts[0].cid),
        num_layers=manifest.num_layers,
        publication=publication,
        total_bytes=total,
        model_name=manifest.model_name,
    )
    if register is not None:
        outcome = register(result.registration())
        if inspect.isawaitable(outcome):
            await outcome
    return result


async def _add_bytes(client: KuboClient, data: bytes, name: str) -> Cid:
    fd, tmp = tempfile.mkstemp(prefix="dlis-publish-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        return (await client.add_file(Path(tmp), name=name, pin=True)).cid
    finally:
        os.unlink(tmp)
