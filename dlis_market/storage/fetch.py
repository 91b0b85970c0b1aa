"""Fetch a published model by its manifest (publication index) CID, verified, into a folder.

Flow: connect to the providers' swarm multiaddrs; read the index; read ``manifest.json`` and
check its sha256 against the index and, when given, the chain's value (:class:`ExpectedManifest`);
check that the index agrees with the manifest about every file; then for each file take it from
the output folder or the local cache if its sha256 already matches, else stream its parts with
``cat`` into ``NAME.partial`` while hashing, and rename to ``NAME`` only once size and sha256
match. A file that arrives corrupt is fetched once more from scratch, then refused with
:class:`ShardIntegrityError`. On any error the ``.partial`` file is removed: no file in the
output folder ever carries its final name without having been verified. ``manifest.json`` is
written last, so its presence means every selected file is there and verified.

``layers`` selects what a worker serving that range needs (:func:`files_for_layers`): the shard
of every stage whose range overlaps it, plus config and tokenizer files; the index is still
checked against the whole manifest. A later fetch into the same folder reuses those files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from dlis_market.storage.cache import FileCache
from dlis_market.storage.client import CatStream, KuboClient
from dlis_market.storage.errors import (
    ContentTimeoutError,
    KuboApiError,
    ManifestError,
    ShardIntegrityError,
    StorageError,
)
from dlis_market.storage.manifest_files import (
    MANIFEST_NAME,
    ManifestFiles,
    files_for_layers,
    parse_manifest,
    sha256_file,
)
from dlis_market.storage.publication import Publication, PublishedFile
from dlis_market.types import Cid, LayerRange

log = logging.getLogger(__name__)

# (bytes verified so far, total bytes); may go down when a corrupt file is fetched again.
ProgressCallback = Callable[[int, int], None]

MAX_INDEX_SIZE = 16 << 20
# How long one provider's swarm/connect may take before fetch_model goes on without it.
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ExpectedManifest:
    """What the chain says about a model: its manifest (index) CID and manifest sha256."""

    sha256: str
    cid: Cid | None = None


@dataclass(frozen=True)
class FetchResult:
    out_dir: Path
    manifest_path: Path
    manifest_sha256: str
    files: tuple[Path, ...]
    downloaded_bytes: int
    reused_bytes: int  # already in the folder or the cache
    connect_errors: tuple[str, ...] = field(default_factory=tuple)
    layers: LayerRange | None = None  # the range the files were selected for; None: the whole model


class _Partial:
    """``NAME.partial`` being written and hashed; removed unless promoted to ``NAME``."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.path = final.with_name(final.name + ".partial")
        final.parent.mkdir(parents=True, exist_ok=True)
        self._out: BinaryIO | None = self.path.open("wb")
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        assert self._out is not None
        self._out.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)

    def promote(self) -> None:
        assert self._out is not None
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        self._out = None
        os.replace(self.path, self.final)

    def discard(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        self.path.unlink(missing_ok=True)


def _local_match(path: Path, size: int, sha256: str) -> bool:
    try:
        return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha256
    except OSError:
        return False


class _Fetcher:
    def __init__(
        self,
        client: KuboClient,
        out_dir: Path,
        cache: FileCache | None,
        part_timeout_s: float,
        progress: ProgressCallback | None,
    ) -> None:
        self.client = client
        self.out_dir = out_dir
        self.cache = cache
        self.part_timeout_s = part_timeout_s
        self.progress = progress
        self.done = 0
        self.total = 0
        self.downloaded = 0
        self.reused = 0

    def _advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    def _open(self, cid: str) -> asyncio.Task[CatStream]:
        return asyncio.create_task(self.client.open_cat(cid, timeout_s=self.part_timeout_s))

    async def _download_once(self, entry: PublishedFile, final: Path) -> bool:
        """Stream every part into NAME.partial; the next part is requested while this one is
        read, so the node fetches part i+1 over bitswap while part i crosses the local API."""
        partial = await asyncio.to_thread(_Partial, final)
        pending: asyncio.Task[CatStream] | None = self._open(entry.parts[0].cid)
        try:
            for i, part in enumerate(entry.parts):
                assert pending is not None
                stream = await pending
                pending = self._open(entry.parts[i + 1].cid) if i + 1 < len(entry.parts) else None
                got = 0
                try:
                    async for chunk in stream.chunks():
                        got += len(chunk)
                        if got > part.size:
                            break  # more than the index promised: corrupt
                        partial.write(chunk)
                        self._advance(len(chunk))
                finally:
                    stream.release()
                if got != part.size:
                    log.warning("%s: part %s gave %d bytes, not %d", entry.path, part.cid, got, part.size)
                    self._advance(-partial.size)
                    return False
            digest = partial.digest.hexdigest()
            if partial.size != entry.size or digest != entry.sha256:
                log.warning("%s: sha256 %s, expected %s", entry.path, digest, entry.sha256)
                self._advance(-partial.size)
                return False
            await asyncio.to_thread(partial.promote)
            self.downloaded += entry.size
            return True
        finally:
            await _drop(pending)
            await asyncio.to_thread(partial.discard)

    async def file(self, entry: PublishedFile) -> Path:
        final = self.out_dir / entry.path
        if await asyncio.to_thread(_local_match, final, entry.size, entry.sha256):
            self.reused += entry.size
            self._advance(entry.size)
            return final
        if self.cache is not None:
            await asyncio.to_thread(final.parent.mkdir, parents=True, exist_ok=True)
            if await asyncio.to_thread(self.cache.materialize, entry.sha256, entry.size, final):
                self.reused += entry.size
                self._advance(entry.size)
                return final
        await asyncio.to_thread(final.unlink, missing_ok=True)  # a stale or corrupt copy
        for attempt in (1, 2):
            if await self._download_once(entry, final):
                if self.cache is not None:
                    await asyncio.to_thread(self.cache.store, entry.sha256, final)
                return final
            if attempt == 1:
                log.warning("%s arrived corrupt: fetching it again from scratch", entry.path)
        raise ShardIntegrityError(
            f"{entry.path} arrived corrupt twice (expected {entry.size} bytes with sha256 "
            f"{entry.sha256}); its publisher serves different bytes than the manifest lists; refused"
        )


async def connect_providers(
    client: KuboClient, providers: list[str] | tuple[str, ...], timeout_s: float = CONNECT_TIMEOUT_S
) -> tuple[str, ...]:
    """``swarm/connect`` to each multiaddr; returns the errors (a provider may be down)."""
    errors = []
    for addr in providers:
        try:
            await client.swarm_connect(addr, timeout_s=timeout_s)
        except StorageError as exc:  # others may still serve the content: report, go on
            log.warning("could not connect to provider %s: %s", addr, exc)
            errors.append(f"{addr}: {exc}")
    return tuple(errors)


def _check_against_manifest(publication: Publication, manifest: ManifestFiles) -> None:
    listed = {f.path: f for f in manifest.files}
    for path, want in listed.items():
        got = publication.file(path)
        if got is None or got.size != want.size or got.sha256 != want.sha256:
            raise ManifestError(
                f"the publication index disagrees with manifest.json about {path} "
                f"(index: {got.size if got else 'missing'} bytes {got.sha256 if got else ''}; "
                f"manifest: {want.size} bytes {want.sha256}); refused"
            )
    extra = [f.path for f in publication.files if f.path not in listed]
    if extra:
        raise ManifestError(f"the publication index has files the manifest does not list: {extra}; refused")


async def fetch_model(
    client: KuboClient,
    cid: str,
    out_dir: Path,
    *,
    providers: list[str] | tuple[str, ...] = (),
    expected: ExpectedManifest | None = None,
    cache_dir: Path | None = None,
    part_timeout_s: float = 120.0,
    progress: ProgressCallback | None = None,
    layers: LayerRange | None = None,
) -> FetchResult:
    """Fetch and verify the model published as ``cid`` into ``out_dir`` (only what ``layers``
    needs, when given); see the module doc."""
    if expected is not None and expected.cid is not None and expected.cid != cid:
        raise ManifestError(f"asked to fetch {cid} but the chain registers manifest CID {expected.cid}")
    connect_errors = await connect_providers(client, providers)
    try:
        index = await client.cat_bytes(cid, timeout_s=part_timeout_s, max_size=MAX_INDEX_SIZE)
    except ContentTimeoutError as exc:
        hint = f"; provider connect errors: {'; '.join(connect_errors)}" if connect_errors else ""
        raise ContentTimeoutError(
            f"manifest CID {cid} was not delivered within {part_timeout_s:.0f}s: no connected peer has "
            f"it. Check the providers' multiaddrs (given: {list(providers) or 'none'}){hint}. ({exc})"
        ) from exc
    except KuboApiError as exc:
        raise ManifestError(f"cannot read manifest CID {cid}: {exc}") from exc
    publication = Publication.from_bytes(index)
    if expected is not None and publication.manifest.sha256 != expected.sha256.lower():
        raise ManifestError(
            f"{cid} publishes a manifest with sha256 {publication.manifest.sha256}, the chain registers "
            f"{expected.sha256}; refused"
        )
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    fetcher = _Fetcher(client, out_dir, FileCache(cache_dir) if cache_dir else None, part_timeout_s, progress)
    fetcher.total = publication.manifest.size + sum(f.size for f in publication.files)
    staging = out_dir / ".dlis-fetch"
    manifest_entry = publication.manifest.model_copy(update={"path": f".dlis-fetch/{MANIFEST_NAME}"})
    manifest_tmp = out_dir / manifest_entry.path
    try:
        await fetcher.file(manifest_entry)
        manifest = parse_manifest(await asyncio.to_thread(manifest_tmp.read_bytes))
        _check_against_manifest(publication, manifest)
        entries = publication.files
        if layers is not None:
            wanted = files_for_layers(manifest, layers)
            entries = tuple(f for f in publication.files if f.path in wanted)
            fetcher.total = publication.manifest.size + sum(f.size for f in entries)
        manifest_path = out_dir / MANIFEST_NAME
        # Another model's manifest must not vouch for the files about to be replaced.
        if not await asyncio.to_thread(_local_match, manifest_path, manifest_entry.size, manifest.sha256):
            await asyncio.to_thread(manifest_path.unlink, missing_ok=True)
        paths = [await fetcher.file(entry) for entry in entries]
        await asyncio.to_thread(os.replace, manifest_tmp, manifest_path)  # last: all selected files verified
    finally:
        await asyncio.to_thread(manifest_tmp.unlink, missing_ok=True)
        await asyncio.to_thread(_rmdir_quiet, staging)
    return FetchResult(
        out_dir=out_dir,
        manifest_path=manifest_path,
        manifest_sha256=manifest.sha256,
        files=tuple(paths),
        downloaded_bytes=fetcher.downloaded,
        reused_bytes=fetcher.reused,
        connect_errors=connect_errors,
        layers=layers,
    )


async def _drop(task: asyncio.Task[CatStream] | None) -> None:
    """Cancel a look-ahead ``cat`` that is no longer wanted, or release its answer."""
    if task is None:
        return
    if not task.done():
        task.cancel()
    try:
        stream = await task
    except (asyncio.CancelledError, StorageError):  # unwanted anyway: nothing to report
        return
    stream.release()


def _rmdir_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty or already gone: leave it
        path.rmdir()
