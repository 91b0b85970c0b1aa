"""The node's trustless gateway (real server over a flatfs block folder) read by the real gateway
client: files as CARs checked block by block, NoFetch, read-only, trustless only."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from dlis_market.storage.errors import DaemonError, GatewayError
from dlis_market.storage.gateway import FLATFS_SHARDING, FlatfsBlocks, GatewayServer
from dlis_market.storage.gateway_client import GatewayClient
from dlis_market.storage.ipld import Cid, node_links

from .fake_kubo import unixfs_file


def store(root: Path, blocks: dict[str, bytes]) -> FlatfsBlocks:
    flatfs = FlatfsBlocks(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "SHARDING").write_text(FLATFS_SHARDING + "\n")
    for cid, block in blocks.items():
        path = flatfs.path(Cid.parse(cid))
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(block)
    return flatfs


@asynccontextmanager
async def serve(flatfs: FlatfsBlocks) -> AsyncIterator[str]:
    flatfs.check()
    runner = web.AppRunner(GatewayServer(flatfs).app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def test_dags_are_built_as_kubo_builds_them() -> None:
    # `ipfs add` of an empty file and of "hello world\n" with Kubo's defaults
    assert unixfs_file(b"")[0] == "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
    assert unixfs_file(b"hello world\n")[0] == "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
    assert str(Cid.parse("bafkqaaa")) == "bafkqaaa" and Cid.parse("bafkqaaa").is_identity


def test_a_file_of_two_dag_levels_arrives_exact_and_checked(tmp_path: Path) -> None:
    data = hashlib.sha256(b"seed").digest() * 6000  # 192000 bytes: 188 chunks of 1 KiB, two levels
    root, blocks = unixfs_file(data, chunk=1024)
    assert any(len(node_links(Cid.parse(c), b)) == 174 for c, b in blocks.items())  # a full inner node

    async def main() -> tuple[bytes, bytes]:
        async with serve(store(tmp_path / "blocks", blocks)) as url, GatewayClient(url) as gw:
            await gw.probe()
            got = await gw.cat_bytes(root)
            async with gw.session.get(f"{url}/ipfs/{root}?format=raw") as response:
                assert response.headers["Content-Type"] == "application/vnd.ipld.raw"
                return got, await response.read()

    got, raw = asyncio.run(main())
    assert got == data
    assert Cid.parse(root).matches(raw)


def test_nofetch_a_cid_the_node_lacks_is_404_at_once(tmp_path: Path) -> None:
    root, blocks = unixfs_file(b"held" * 1000, chunk=1024)
    absent, _ = unixfs_file(b"not held here", chunk=1024)

    async def main() -> None:
        async with serve(store(tmp_path / "blocks", blocks)) as url, GatewayClient(url) as gw:
            started = time.monotonic()
            with pytest.raises(GatewayError, match=r"answered HTTP 404 .*NoFetch"):
                await gw.open_cat(absent, timeout_s=30)
            assert time.monotonic() - started < 2

    asyncio.run(main())


def test_a_missing_child_block_cuts_the_car_and_the_client_says_so(tmp_path: Path) -> None:
    root, blocks = unixfs_file(b"x" * 1000 + b"y" * 1000 + b"z" * 1000, chunk=1000)
    child = node_links(Cid.parse(root), blocks[root])[1]
    del blocks[str(child)]

    async def main() -> None:
        async with serve(store(tmp_path / "blocks", blocks)) as url, GatewayClient(url) as gw:
            with pytest.raises(GatewayError, match=r"cut off|incomplete"):
                await gw.cat_bytes(root, timeout_s=10)

    asyncio.run(main())


def test_read_only_and_trustless_only(tmp_path: Path) -> None:
    root, blocks = unixfs_file(b"abc" * 100, chunk=1024)

    async def main() -> dict[str, int]:
        statuses = {}
        async with serve(store(tmp_path / "blocks", blocks)) as url, aiohttp.ClientSession() as http:
            for method in ("POST", "PUT", "DELETE"):
                async with http.request(method, f"{url}/ipfs/{root}", data=b"x") as response:
                    statuses[method] = response.status
            async with http.get(f"{url}/ipfs/{root}") as response:  # a deserialized response: refused
                statuses["plain"] = response.status
            headers = {"Accept": "application/vnd.ipld.car; version=1; order=dfs; dups=n"}
            async with http.get(f"{url}/ipfs/{root}?format=car", headers=headers) as response:
                statuses["dups=n"] = response.status
            async with http.get(f"{url}/ipfs/{root}/path?format=car") as response:
                statuses["path"] = response.status
            async with http.get(f"{url}/api/v0/version") as response:
                statuses["rpc"] = response.status
        return statuses

    assert asyncio.run(main()) == {
        "POST": 405,
        "PUT": 405,
        "DELETE": 405,
        "plain": 400,
        "dups=n": 406,
        "path": 404,
        "rpc": 404,
    }


def test_a_block_store_of_another_layout_is_refused(tmp_path: Path) -> None:
    (tmp_path / "blocks").mkdir()
    (tmp_path / "blocks" / "SHARDING").write_text("/repo/flatfs/shard/v1/prefix/2\n")
    with pytest.raises(DaemonError, match=r"expected /repo/flatfs/shard/v1/next-to-last/2"):
        FlatfsBlocks(tmp_path / "blocks").check()
