"""Parts fetched from several providers' gateways at once (in-process fake Kubo nodes and their
trustless gateways as the providers): spread, a provider that lies or dies costs only its parts,
refusals, an RPC URL given as a provider refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from dlis_market.storage.client import KuboClient
from dlis_market.storage.errors import GatewayError, ProviderError, ShardIntegrityError
from dlis_market.storage.fetch import FetchResult, fetch_model, provider_gateway_url
from dlis_market.storage.part_fetch import LOCAL_NODE
from dlis_market.storage.publication import Publication, PublishedFile
from dlis_market.storage.publish import publish_model

from .fake_kubo import FakeState, fake_gateway, fake_kubo
from .test_storage_fetch import make_shards, no_partials

PART = 4096


@asynccontextmanager
async def providers(n: int, shards: Path) -> AsyncIterator[tuple[str, FakeState, list[tuple[str, FakeState]], str]]:
    """The worker's own (fake) node plus ``n`` providers, each holding the published shards and
    serving them on a gateway of its own. Yields (worker RPC url, worker state, [(provider
    gateway url, state)], index CID)."""
    async with AsyncExitStack() as stack:
        own_url, own = await stack.enter_async_context(fake_kubo(FakeState(peer_id="QmOwn")))
        provs = []
        cid = ""
        for i in range(n):
            rpc_url, state = await stack.enter_async_context(fake_kubo(FakeState(peer_id=f"QmP{i}")))
            async with KuboClient(rpc_url) as kubo:
                cid = (await publish_model(kubo, shards, part_size=PART)).manifest_cid
            provs.append((await stack.enter_async_context(fake_gateway(state)), state))
        for _, state in provs:
            state.gateway_calls.clear()
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
            parts = shard_parts(provs[0][1], cid, "w.bin").parts
            for _, state in provs:
                assert sum(state.gateway_calls.get(p.cid, 0) for p in parts) >= 3
            assert sum(s.gateway_calls.get(p.cid, 0) for _, s in provs for p in parts) == len(parts)
            # the index came from the first gateway, checked block by block against its CID
            assert provs[0][1].gateway_calls[cid] == 1
            # the worker's own node was not needed: no swarm connection, no cat
            assert own.connected == [] and own.cat_calls == {}
            return result

    result = asyncio.run(main())
    assert (tmp_path / "out" / "w.bin").read_bytes() == (shards / "w.bin").read_bytes()
    assert result.parts_repeated == 0 and all(s.failure is None for s in result.sources)
    assert LOCAL_NODE not in {s.name for s in result.sources}
    assert no_partials(tmp_path / "out")


def test_a_gateway_serving_blocks_that_do_not_match_their_cid_is_dropped(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"w.bin": 12 * PART})

    async def main() -> FetchResult:
        async with providers(3, shards) as (own_url, own, provs, cid):
            provs[1][1].corrupt_all = True  # a forger: same CIDs, other bytes
            return await fetch(own_url, cid, tmp_path / "out", [u for u, _ in provs])

    result = asyncio.run(main())
    assert (tmp_path / "out" / "w.bin").read_bytes() == (shards / "w.bin").read_bytes()
    liar = result.sources[1]
    assert liar.parts == 0 and liar.failure is not None and "served wrong bytes" in liar.failure
    assert "does not hash to its CID" in liar.failure
    # It had at most its two streams' parts in hand: only those were fetched again.
    assert 1 <= result.parts_repeated <= 2


def test_a_provider_dying_mid_fetch_costs_only_its_unfinished_parts(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"w.bin": 24 * PART})

    async def main() -> FetchResult:
        async with providers(3, shards) as (own_url, own, provs, cid):
            provs[0][1].die_after_cats = 3  # after three answers, its CARs are cut mid-stream
            return await fetch(own_url, cid, tmp_path / "out", [u for u, _ in provs])

    result = asyncio.run(main())
    assert (tmp_path / "out" / "w.bin").read_bytes() == (shards / "w.bin").read_bytes()
    dead = result.sources[0]
    assert dead.failure is not None and "cut off" in dead.failure
    assert dead.parts >= 2  # what it delivered before dying was kept (the index was its first answer)
    assert 1 <= result.parts_repeated <= 2  # its unfinished parts, nothing else
    assert sum(s.parts for s in result.sources) == 24 + 1  # the shard's parts and the manifest


def test_every_provider_failing_is_a_typed_error_naming_each(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"w.bin": 6 * PART})

    async def main() -> None:
        async with providers(2, shards) as (own_url, own, provs, cid):
            for _, state in provs:
                state.die_after_cats = 1
            with pytest.raises(GatewayError, match=r"w\.bin: \d+ of 6 parts could not be fetched") as info:
                await fetch(own_url, cid, tmp_path / "out", [u for u, _ in provs])
            assert all(u in str(info.value) for u, _ in provs)

    asyncio.run(main())
    assert not (tmp_path / "out" / "w.bin").exists() and no_partials(tmp_path / "out")


def test_a_shard_every_provider_serves_wrong_is_refused(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"w.bin": 6 * PART})

    async def main() -> None:
        async with providers(2, shards) as (own_url, own, provs, cid):
            for _, state in provs:  # each serves other bytes for the shard's parts, once
                state.corrupt_once = {p.cid for p in shard_parts(state, cid, "w.bin").parts}
            with pytest.raises(ShardIntegrityError, match=r"w\.bin: .* every source failed") as info:
                await fetch(own_url, cid, tmp_path / "out", [u for u, _ in provs])
            assert str(info.value).count("served wrong bytes") == 2

    asyncio.run(main())
    assert not (tmp_path / "out" / "w.bin").exists() and no_partials(tmp_path / "out")


def test_a_gateway_that_is_down_is_reported_and_the_others_serve(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"w.bin": 4 * PART})

    async def main() -> FetchResult:
        async with providers(2, shards) as (own_url, own, provs, cid):
            down = "http://127.0.0.1:9"  # discard port: nothing listens
            return await fetch(own_url, cid, tmp_path / "out", [down, *(u for u, _ in provs)])

    result = asyncio.run(main())
    assert (tmp_path / "out" / "w.bin").read_bytes() == (shards / "w.bin").read_bytes()
    assert len(result.connect_errors) == 1 and result.connect_errors[0].startswith("http://127.0.0.1:9: ")
    assert len(result.sources) == 2


def test_an_rpc_url_given_as_a_provider_is_refused(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"w.bin": 2 * PART})

    async def main() -> None:
        async with providers(1, shards) as (own_url, own, provs, cid), fake_kubo() as (rpc_url, _):
            with pytest.raises(ProviderError, match=r"is a Kubo RPC API .* Pass the provider's gateway URL"):
                await fetch(own_url, cid, tmp_path / "out", [provs[0][0], rpc_url])

    asyncio.run(main())
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_provider_strings_are_multiaddrs_or_gateway_urls() -> None:
    assert provider_gateway_url("/ip4/127.0.0.1/tcp/4801/p2p/QmA") is None
    assert provider_gateway_url("http://127.0.0.1:8801/") == "http://127.0.0.1:8801"
    # a gateway is safe to expose: any host is taken, its blocks are checked against their CIDs
    assert provider_gateway_url("https://gw.example.org") == "https://gw.example.org"
    for url in ("http://127.0.0.1:5801/api/v0", "http://10.0.0.5:5001/api/v0/cat?arg=Qm"):
        with pytest.raises(ProviderError, match=r"Kubo RPC API.*gateway URL"):
            provider_gateway_url(url)
    with pytest.raises(ProviderError, match=r"neither a swarm multiaddr .* nor a gateway URL"):
        provider_gateway_url("ftp://127.0.0.1:21")
