"""One-call publish and fetch for other components (worker node, CLI), configured by settings.

    result = await fetch_shards(settings, cid, out_dir, providers=[...], expected=ExpectedManifest(sha, cid),
                                layers=LayerRange(start=0, end=10))  # only what a [0, 10) worker needs
    published = await publish_shards(settings, shard_dir, register=hook)

Both pick the Kubo to use with :func:`~dlis_market.storage.session.kubo_session` (the configured
URL, else the running embedded daemon, else one started for the call) and take part size,
timeouts, provider multiaddrs (``storage.peers``) and the cache folder (``HOME/cache/shards``)
from settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dlis_market.settings import Settings
from dlis_market.storage.fetch import ExpectedManifest, FetchResult, fetch_model
from dlis_market.storage.fetch import ProgressCallback as FetchProgress
from dlis_market.storage.publish import ProgressCallback as PublishProgress
from dlis_market.storage.publish import PublishResult, RegisterHook, publish_model
from dlis_market.storage.session import kubo_session
from dlis_market.types import LayerRange


def cache_dir(settings: Settings) -> Path:
    return settings.home / "cache" / "shards"


async def fetch_shards(
    settings: Settings,
    cid: str,
    out_dir: Path,
    *,
    providers: Sequence[str] = (),
    expected: ExpectedManifest | None = None,
    use_cache: bool = True,
    progress: FetchProgress | None = None,
    layers: LayerRange | None = None,
) -> FetchResult:
    """Fetch and verify the model published as ``cid`` into ``out_dir`` (see :mod:`.fetch`); with
    ``layers``, only the shards of the stages overlapping that range plus config and tokenizer."""
    addrs = list(dict.fromkeys([*providers, *settings.storage.peers]))
    async with kubo_session(settings) as kubo:
        return await fetch_model(
            kubo,
            cid,
            out_dir,
            providers=addrs,
            expected=expected,
            cache_dir=cache_dir(settings) if use_cache else None,
            part_timeout_s=settings.storage.fetch_timeout_s,
            progress=progress,
            layers=layers,
        )


async def publish_shards(
    settings: Settings,
    shard_dir: Path,
    *,
    register: RegisterHook | None = None,
    progress: PublishProgress | None = None,
) -> PublishResult:
    """Add and pin a shard folder and its publication index (see :mod:`.publish`)."""
    async with kubo_session(settings) as kubo:
        return await publish_model(
            kubo, shard_dir, part_size=settings.storage.part_size_mb << 20, register=register, progress=progress
        )
