"""Slow cases (`-m heavy`): large shards node to node, and a provider that dies mid-transfer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from kubo_helpers import NodeFactory, write_shards  # type: ignore[import-not-found]

from dlis_market.storage.client import KuboClient
from dlis_market.storage.errors import ContentTimeoutError
from dlis_market.storage.fetch import fetch_model
from dlis_market.storage.publish import publish_model

pytestmark = pytest.mark.heavy


def test_64mb_shard_node_to_node_byte_identical(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", {"w.bin": 64 << 20})
    a, b = kubo_nodes("a"), kubo_nodes("b")

    async def main() -> None:
        async with KuboClient(a.info.api_url, timeout_s=120) as ka, KuboClient(b.info.api_url) as kb:
            published = await publish_model(ka, shards)
            await fetch_model(kb, published.manifest_cid, tmp_path / "out", providers=a.info.multiaddrs)

    asyncio.run(main())
    assert (tmp_path / "out" / "w.bin").read_bytes() == (shards / "w.bin").read_bytes()


def test_provider_killed_mid_transfer_times_out_cleanly(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", {"w.bin": 8 << 20})
    a, b = kubo_nodes("a"), kubo_nodes("b")
    out = tmp_path / "out"

    async def main() -> None:
        async with KuboClient(a.info.api_url) as ka, KuboClient(b.info.api_url, retries=0) as kb:
            published = await publish_model(ka, shards, part_size=1 << 20)
            killed = False

            def progress(done: int, total: int) -> None:
                nonlocal killed
                if not killed and done > 0 and (out / "w.bin.partial").exists():
                    a.kill()  # the only provider dies after the first part arrived
                    killed = True

            with pytest.raises(ContentTimeoutError):
                await fetch_model(
                    kb,
                    published.manifest_cid,
                    out,
                    providers=a.info.multiaddrs,
                    part_timeout_s=4,
                    progress=progress,
                )
            assert killed

    asyncio.run(main())
    assert not (out / "w.bin").exists()
    assert not any(p.name.endswith(".partial") for p in out.rglob("*"))
