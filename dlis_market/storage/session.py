"""Which Kubo a dlis command talks to: one URL, or the embedded daemon.

- ``storage.kubo_api_url`` set: that Kubo RPC API (a user's Kubo daemon, or a remote embedded one).
- else the embedded daemon of ``storage.repo_dir`` (default ``HOME/ipfs``) if one is running
  (``REPO/api.json`` answers);
- else an embedded daemon is started for the duration of the command, on any free ports, and
  stopped afterwards (content it added stays pinned in the repo for ``dlis ipfs daemon`` to serve),
  unless the command reports on the node in use (``start=False``: ``dlis ipfs id``), where a
  throwaway node's answer would mean nothing: that raises :class:`NoDaemonError` saying what to do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from dlis_market.settings import Settings
from dlis_market.storage.client import KuboClient
from dlis_market.storage.daemon import DaemonConfig, EmbeddedDaemon, running_daemon
from dlis_market.storage.errors import NoDaemonError

log = logging.getLogger(__name__)


def client_for(settings: Settings, url: str) -> KuboClient:
    s = settings.storage
    return KuboClient(url, timeout_s=s.request_timeout_s, retries=s.retries, backoff_s=s.retry_backoff_s)


@asynccontextmanager
async def kubo_session(settings: Settings, *, start: bool = True) -> AsyncIterator[KuboClient]:
    """A connected :class:`KuboClient` per the rules above; cleans up what it started."""
    if settings.storage.kubo_api_url:
        async with client_for(settings, settings.storage.kubo_api_url) as client:
            yield client
        return
    config = DaemonConfig.from_settings(settings)
    info = await asyncio.to_thread(running_daemon, config.repo)
    if info is not None:
        async with client_for(settings, info.api_url) as client:
            yield client
        return
    if not start:
        raise NoDaemonError(
            f"no IPFS daemon is running for repo {config.repo}; start one with `dlis ipfs daemon` "
            "(or point DLIS_STORAGE__KUBO_API_URL at a running Kubo)"
        )
    daemon = EmbeddedDaemon(dataclasses.replace(config, api_port=0, swarm_port=0, gateway_port=0))
    info = await asyncio.to_thread(daemon.start)
    log.info("started an embedded IPFS daemon for this command: %s", info.api_url)
    try:
        async with client_for(settings, info.api_url) as client:
            yield client
    finally:
        await asyncio.to_thread(daemon.stop)
