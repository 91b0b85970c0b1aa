"""Fetch a published model by its manifest (publication index) CID, verified, into a folder.

Flow: connect to the providers; read the index; read ``manifest.json`` and check its sha256
against the index and, when given, the chain's value (:class:`ExpectedManifest`); check that the
index agrees with the manifest about every file; then for each file take it from the output
folder or the local cache if its sha256 already matches, else fetch its parts from every source
at once (:mod:`dlis_market.storage.part_fetch`: each part checked against its sha256 as it
streams, written at its offset in ``NAME.partial``, a failed source costing only its unfinished
parts) and rename to ``NAME`` only once the whole file's size and sha256 match. On any error the
``.partial`` file is removed: no file in the output folder ever carries its final name without
having been verified. ``manifest.json`` is written last, so its presence means every selected
file is there and verified.

Providers are given as strings, each either

- a swarm multiaddr (``/ip4/127.0.0.1/tcp/4801/p2p/Qm...``): the worker's own node connects to
  it, and reads parts over bitswap from all such providers at once (one source, "local node");
- the URL of a provider's read-only trustless HTTP gateway (``http://HOST:8801``, what ``dlis
  ipfs id`` prints as gateway): the index, the manifest and the parts are read straight from
  that node as CARs, every block checked against its CID as it streams, each provider a source
  of its own, in parallel (:mod:`dlis_market.storage.gateway_client`). The worker's own node is
  then not needed for content. A gateway that is down is reported and skipped; a Kubo RPC API
  URL given instead is refused with :class:`ProviderError` (the RPC API is an admin interface
  that must stay private to its machine: pass the gateway URL).

Format 1 indexes (no part sha256) are read too: their files are checked as a whole, and a file
that arrives corrupt is fetched once more from scratch, from CID-checking nodes, then refused
with :class:`ShardIntegrityError`.

``layers`` selects what a worker serving that range needs (:func:`files_for_layers`): the shard
of every stage whose range overlaps it, plus config and tokenizer files; the index is still
checked against the whole manifest. A later fetch into the same folder reuses those files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dlis_market.storage.cache import FileCache
from dlis_market.storage.client import KuboClient
from dlis_market.storage.errors import (
    ContentTimeoutError,
    GatewayError,
    KuboApiError,
    LocalNodeRequiredError,
    ManifestError,
    ProviderError,
    ShardIntegrityError,
    StorageError,
)
from dlis_market.storage.gateway_client import GatewayClient
from dlis_market.storage.manifest_files import (
    MANIFEST_NAME,
    ManifestFiles,
    files_for_layers,
    parse_manifest,
    sha256_file,
)
from dlis_market.storage.part_fetch import LOCAL_NODE, PartialFile, PartSource, SourceReport, fetch_parts
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
    sources: tuple[SourceReport, ...] = ()  # what each source delivered; a failed one says why
    parts_repeated: int = 0  # part fetches done again: a failed source's unfinished parts, wrong bytes


def _local_match(path: Path, size: int, sha256: str) -> bool:
    try:
        return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha256
    except OSError:
        return False


class _Fetcher:
    def __init__(
        self,
        sources: list[PartSource],
        out_dir: Path,
        cache: FileCache | None,
        part_timeout_s: float,
        progress: ProgressCallback | None,
        parts_verifiable: bool,
    ) -> None:
        self.sources = sources
        self.out_dir = out_dir
        self.cache = cache
        self.part_timeout_s = part_timeout_s
        self.progress = progress
        self.parts_verifiable = parts_verifiable
        self.done = 0
        self.total = 0
        self.downloaded = 0
        self.reused = 0
        self.parts_repeated = 0

    def _advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    async def _download_once(self, entry: PublishedFile, final: Path, sources: list[PartSource]) -> bool:
        """All parts into NAME.partial from ``sources`` at once; promoted to NAME if the whole
        file's size and sha256 match. False: it does not (only possible with format 1 indexes,
        whose parts carry no sha256; with format 2 every part was checked, so a whole-file
        mismatch means the index contradicts itself and is refused here)."""
        partial = await asyncio.to_thread(PartialFile, final, entry.size)
        try:
            digest, repeated = await fetch_parts(
                entry, partial, sources, timeout_s=self.part_timeout_s, advance=self._advance
            )
            self.parts_repeated += repeated
            if digest != entry.sha256:
                log.warning("%s: sha256 %s, expected %s", entry.path, digest, entry.sha256)
                self._advance(-entry.size)
                if self.parts_verifiable:
                    raise ShardIntegrityError(
                        f"{entry.path}: every part matched its sha256 but the file hashes to {digest}, not "
                        f"{entry.sha256}: the publication index contradicts itself; refused"
                    )
                return False
            await partial.run(partial.promote)
            self.downloaded += entry.size
            return True
        finally:
            await partial.run(partial.discard)

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
        sources = self.sources
        for attempt in (1, 2):
            if await self._download_once(entry, final, sources):
                if self.cache is not None:
                    await asyncio.to_thread(self.cache.store, entry.sha256, final)
                return final
            if attempt == 1:
                log.warning("%s arrived corrupt: fetching it again from scratch", entry.path)
                # Parts from a source that does not check blocks against their CIDs may be what
                # was wrong (format 1 has no part sha256): the second try takes them from sources
                # that do (the local node and gateways both do).
                sources = [s for s in self.sources if s.cid_verified] or self.sources
        raise ShardIntegrityError(
            f"{entry.path} arrived corrupt twice (expected {entry.size} bytes with sha256 "
            f"{entry.sha256}); its publisher serves different bytes than the manifest lists; refused"
        )


def provider_gateway_url(provider: str) -> str | None:
    """The gateway URL when ``provider`` is one (``http(s)://HOST:PORT``), None for a swarm
    multiaddr. A URL into the Kubo RPC API (``.../api/v0``) is refused at once; one that only
    answers like an RPC API is refused when probed (:meth:`GatewayClient.probe`)."""
    if provider.startswith("/"):
        return None
    parts = urlsplit(provider)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProviderError(
            f"provider {provider!r} is neither a swarm multiaddr (/ip4/.../tcp/.../p2p/...) nor a gateway URL "
            "(http://HOST:PORT)"
        )
    if parts.path.rstrip("/").startswith("/api/v0") or parts.query:
        raise ProviderError(
            f"provider {provider} points into a Kubo RPC API; that is an admin interface that must stay private "
            "to its machine. Pass the provider's gateway URL (http://HOST:PORT, `dlis ipfs id` prints it)"
        )
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


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


async def _gateway_sources(
    urls: list[str], stack: contextlib.AsyncExitStack
) -> tuple[list[PartSource], list[GatewayClient], list[str]]:
    """A source per gateway URL that passes the probe; the errors of those that do not answer.
    An RPC API given as a gateway raises :class:`ProviderError` (the whole fetch is refused)."""
    sources: list[PartSource] = []
    clients: list[GatewayClient] = []
    errors: list[str] = []
    for url in urls:
        gateway = await stack.enter_async_context(GatewayClient(url))
        try:
            await gateway.probe()
        except ProviderError:
            raise
        except StorageError as exc:  # the others may still serve the content: report, go on
            log.warning("provider gateway %s: %s", url, exc)
            errors.append(f"{url}: {exc}")
            continue
        sources.append(PartSource(url, gateway, cid_verified=True))
        clients.append(gateway)
    return sources, clients, errors


async def _read_index(
    client: KuboClient | None, gateways: list[GatewayClient], cid: str, timeout_s: float, errors: list[str]
) -> bytes:
    """The publication index: from the first gateway that delivers it (every block checked
    against ``cid``), else from the worker's own node when it is a source (``client``)."""
    last: StorageError | None = None
    for gateway in gateways:
        try:
            return await gateway.cat_bytes(cid, timeout_s=timeout_s, max_size=MAX_INDEX_SIZE)
        except StorageError as exc:  # another gateway or the local node may have it
            log.warning("index %s from %s: %s", cid, gateway.url, exc)
            errors.append(f"{gateway.url}: {exc}")
            last = exc
    if client is None:
        kind = type(last) if last is not None else GatewayError
        raise kind(f"no provider gateway delivered the index {cid}: {'; '.join(errors) or 'none was given'}")
    return await client.cat_bytes(cid, timeout_s=timeout_s, max_size=MAX_INDEX_SIZE)


async def fetch_model(
    client: KuboClient | None,
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
    needs, when given); ``providers``: swarm multiaddrs and/or gateway URLs. See the module doc.
    ``client`` is the worker's own IPFS node; without one (None) only gateways serve, and
    :class:`LocalNodeRequiredError` is raised before anything is written when that cannot do
    (swarm providers given, or no gateway answered)."""
    if expected is not None and expected.cid is not None and expected.cid != cid:
        raise ManifestError(f"asked to fetch {cid} but the chain registers manifest CID {expected.cid}")
    urls = [u for u in (provider_gateway_url(p) for p in providers) if u is not None]
    multiaddrs = [p for p in providers if provider_gateway_url(p) is None]
    async with contextlib.AsyncExitStack() as stack:
        sources, gateways, url_errors = await _gateway_sources(urls, stack)
        connect_errors = tuple(url_errors)
        if multiaddrs or not sources:  # the worker's own node fetches (bitswap)
            if client is None:
                why = f"swarm providers {multiaddrs}" if multiaddrs else f"no gateway answered: {'; '.join(url_errors)}"
                raise LocalNodeRequiredError(f"fetching {cid} needs an IPFS node of this worker's own: {why}")
            connect_errors = await connect_providers(client, multiaddrs) + connect_errors
            sources.append(PartSource(LOCAL_NODE, client, cid_verified=True))
        index_errors: list[str] = []
        try:
            local = client if any(s.name == LOCAL_NODE for s in sources) else None
            index = await _read_index(local, gateways, cid, part_timeout_s, index_errors)
        except ContentTimeoutError as exc:
            connect_errors += tuple(index_errors)
            hint = f"; provider connect errors: {'; '.join(connect_errors)}" if connect_errors else ""
            raise ContentTimeoutError(
                f"manifest CID {cid} was not delivered within {part_timeout_s:.0f}s: no connected peer has it. "
                f"Check the providers' multiaddrs and gateway URLs (given: {list(providers) or 'none'}){hint}. ({exc})"
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
        cache = FileCache(cache_dir) if cache_dir else None
        fetcher = _Fetcher(sources, out_dir, cache, part_timeout_s, progress, publication.parts_verifiable)
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
            sources=tuple(s.report() for s in sources),
            parts_repeated=fetcher.parts_repeated,
        )


def _rmdir_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty or already gone: leave it
        path.rmdir()
