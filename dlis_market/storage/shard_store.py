"""One-call publish and fetch for other components (worker node, CLI), configured by settings.

    result = await fetch_shards(settings, cid, out_dir, providers=[...], expected=ExpectedManifest(sha, cid),
                                layers=LayerRange(start=0, end=10))  # only what a [0, 10) worker needs
    published = await publish_shards(settings, shard_dir, register=hook)

Both pick the Kubo to use with :func:`~dlis_market.storage.session.kubo_session` (the configured
URL, else the running embedded daemon, else one started for the call; a fetch whose providers
are all gateways uses none unless no gateway answers) and take part size,
timeouts, provider multiaddrs (``storage.peers``) and the cache folder (``HOME/cache/shards``)
from settings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from dlis_market.settings import Settings
from dlis_market.storage.client import KuboClient
from dlis_market.storage.errors import LocalNodeRequiredError
from dlis_market.storage.fetch import ExpectedManifest, FetchResult, fetch_model, provider_gateway_url
from dlis_market.storage.fetch import ProgressCallback as FetchProgress
from dlis_market.storage.publish import ProgressCallback as PublishProgress
from dlis_market.storage.publish import PublishResult, RegisterHook, publish_model
from dlis_market.storage.session import kubo_session
from dlis_market.types import LayerRange

log = logging.getLogger(__name__)


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

    async def fetch(kubo: KuboClient | None) -> FetchResult:
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

    if addrs and not settings.storage.kubo_api_url and all(provider_gateway_url(a) is not None for a in addrs):
        # Gateways alone serve the parts, so no IPFS node of our own is needed: starting one
        # for the call cost a worker 2-4 s of its start (`make demo`'s workers fetch this way).
        try:
            return await fetch(None)
        except LocalNodeRequiredError as exc:  # no gateway answered: our own node may still find it
            log.info("%s; starting one", exc)
    async with kubo_session(settings) as kubo:
        return await fetch(kubo)


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
