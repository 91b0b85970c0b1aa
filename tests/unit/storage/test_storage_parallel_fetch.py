"""Parts fetched from several providers at once (in-process fake Kubo APIs as the providers):
spread, a provider that lies or dies costs only its parts, refusals, loopback-only RPC URLs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from dlis_market.storage.client import KuboClient
from dlis_market.storage.errors import KuboUnreachableError, ProviderError, ShardIntegrityError
from dlis_market.storage.fetch import FetchResult, fetch_model, provider_api_url
from dlis_market.storage.part_fetch import LOCAL_NODE
from dlis_market.storage.publication import Publication, PublishedFile

from .fake_kubo import FakeState, fake_kubo
from .test_storage_fetch import make_shards, no_partials

PART = 4096


@asynccontextmanager
async def providers(n: int, shards: Path) -> AsyncIterator[tuple[str, FakeState, list[tuple[str, FakeState]], str]]:
    """The worker's own (fake) node plus ``n`` providers, each holding the published shards.
    Yields (worker url, worker state, [(provider url, state)], index CID)."""
    async with AsyncExitStack() as stack:
        own_url, own = await stack.enter_async_context(fake_kubo(FakeState(peer_id="QmOwn")))
        provs = [await stack.enter_async_context(fake_kubo(FakeState(peer_id=f"QmP{i}"))) for i in range(n)]
        cid = ""
        for url, _ in [(own_url, own), *provs]:
            async with KuboClient(url) as kubo:
                from dlis_market.storage.publish import publish_model

                cid = (await publish_model(kubo, shards, part_size=PART)).manifest_cid
        for _, state in provs:
            state.cat_calls.clear()
        yield own_url, own, provs, cid


def shard_parts(state: FakeState, cid: str, path: str) -> PublishedFile:
    entry = Publication.from_bytes(state.blobs[cid]).file(path)
    assert entry is not None
    return entry


async def fetch(own_url: str, cid: str, out: Path, urls: list[str]) -> FetchResult:
    async with KuboClient(own_url) as kubo:
        return await fetch_model(kubo, cid, out, providers=urls, part_timeout_s=5)


def test_parts_are_spread_over_every_provider_and_the_file_is_exact(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"w.bin": 12 * PART + 5})

    async def main() -> FetchResult:
        async with providers(3, shards) as (own_url, own, provs, cid):
            result = await fetch(own_url, cid, tmp_path / "out", [u for u, _ in provs])
            parts = shard_parts(own, cid, "w.bin").parts
            # The worker's node gave the index and manifest (checked by CID), no shard part.
            assert not any(own.cat_calls.get(p.cid) for p in parts)
            for _, state in provs:
                assert sum(state.cat_calls.get(p.cid, 0) for p in parts) >= 3
            assert sum(s.cat_calls.get(p.cid, 0) for _, s in provs for p in parts) == len(parts)
            # the worker's node joined each provider's swarm (for the index and manifest)
            assert {a.rsplit("/", 1)[-1] for a in own.connected} == {"QmP0", "QmP1", "QmP2"}
            return result

    result = asyncio.run(main())
    assert (tmp_path / "out" / "w.bin").read_bytes() == (shards / "w.bin").read_bytes()
    assert result.parts_repeated == 0 and all(s.failure is None for s in result.sources)
    assert LOCAL_NODE not in {s.name for s in result.sources}
    assert no_partials(tmp_path / "out")


def test_a_provider_serving_wrong_bytes_is_dropped_and_its_parts_come_from_the_others(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"w.bin": 12 * PART})

    async def main() -> FetchResult:
        async with providers(3, shards) as (own_url, own, provs, cid):
            provs[1][1].corrupt_all = True  # a forger: same CIDs, other bytes
            return await fetch(own_url, cid, tmp_path / "out", [u for u, _ in provs])

    result = asyncio.run(main())
    assert (tmp_path / "out" / "w.bin").read_bytes() == (shards / "w.bin").read_bytes()
    liar = result.sources[1]
    assert liar.parts == 0 and liar.failure is not None and "wrong bytes" in liar.failure
    # It had at most its two streams' parts in hand: only those were fetched again.
    assert 1 <= result.parts_repeated <= 2


def test_a_provider_dying_mid_fetch_costs_only_its_unfinished_parts(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"w.bin": 24 * PART})

    async def main() -> tuple[FetchResult, list[tuple[str, FakeState]]]:
        async with providers(3, shards) as (own_url, own, provs, cid):
            provs[0][1].die_after_cats = 3  # after three parts, its connections are cut mid-part
            return await fetch(own_url, cid, tmp_path / "out", [u for u, _ in provs]), provs

    result, provs = asyncio.run(main())
    assert (tmp_path / "out" / "w.bin").read_bytes() == (shards / "w.bin").read_bytes()
    dead = result.sources[0]
    assert dead.failure is not None and "cut off" in dead.failure
    assert dead.parts >= 2  # what it delivered before dying was kept
    assert 1 <= result.parts_repeated <= 2  # its unfinished parts, nothing else
    assert sum(s.parts for s in result.sources) == 24 + 1  # the shard's parts and the manifest


def test_every_provider_failing_is_a_typed_error_naming_each(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"w.bin": 6 * PART})

    async def main() -> None:
        async with providers(2, shards) as (own_url, own, provs, cid):
            for _, state in provs:
                state.die_after_cats = 1
            with pytest.raises(KuboUnreachableError, match=r"w\.bin: \d+ of 6 parts could not be fetched") as info:
                await fetch(own_url, cid, tmp_path / "out", [u for u, _ in provs])
            assert all(u in str(info.value) for u, _ in provs)

    asyncio.run(main())
    assert not (tmp_path / "out" / "w.bin").exists() and no_partials(tmp_path / "out")


def test_a_shard_every_provider_serves_wrong_is_refused(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"w.bin": 6 * PART})

    async def main() -> None:
        async with providers(2, shards) as (own_url, own, provs, cid):
            for _, state in provs:  # each serves other bytes for the shard's parts, once
                state.corrupt_once = {p.cid for p in shard_parts(own, cid, "w.bin").parts}
            with pytest.raises(ShardIntegrityError, match=r"w\.bin: .* every source failed") as info:
                await fetch(own_url, cid, tmp_path / "out", [u for u, _ in provs])
            assert str(info.value).count("served wrong bytes") == 2

    asyncio.run(main())
    assert not (tmp_path / "out" / "w.bin").exists() and no_partials(tmp_path / "out")


def test_rpc_urls_are_taken_on_loopback_only() -> None:
    assert provider_api_url("http://127.0.0.1:5801/") == "http://127.0.0.1:5801"
    assert provider_api_url("http://localhost:5801") == "http://localhost:5801"
    assert provider_api_url("http://[::1]:5801") == "http://[::1]:5801"
    assert provider_api_url("/ip4/127.0.0.1/tcp/4801/p2p/QmA") is None
    for url in ("http://10.0.0.5:5801", "http://example.org:5801", "https://0.0.0.0:1"):
        with pytest.raises(ProviderError, match=r"off loopback.*swarm multiaddr"):
            provider_api_url(url)
