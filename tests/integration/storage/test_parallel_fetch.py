"""A shard fetched from several real IPFS nodes' gateways at once: parts spread over the providers,
each block checked against its CID and each part against its sha256, a provider killed mid-fetch
costing only its parts, a wrong part sha256 refused, an RPC URL refused, and a gateway that does
not fetch what its node lacks (NoFetch)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import aiohttp
import pytest
from kubo_helpers import NodeFactory, write_shards  # type: ignore[import-not-found]

from dlis_market.storage.client import KuboClient
from dlis_market.storage.daemon import EmbeddedDaemon
from dlis_market.storage.errors import ProviderError, ShardIntegrityError
from dlis_market.storage.fetch import FetchResult, fetch_model
from dlis_market.storage.gateway import FlatfsBlocks
from dlis_market.storage.ipld import Cid
from dlis_market.storage.publication import Publication
from dlis_market.storage.publish import PublishResult, publish_model

MB = 1 << 20
PARTS = 16


def _no_partials(out: Path) -> bool:
    return not any(p.name.endswith(".partial") for p in out.rglob("*")) if out.exists() else True


async def _publish_on(nodes: list[EmbeddedDaemon], shards: Path) -> PublishResult:
    """Publish the same folder on every node (same bytes, same CIDs): each is a provider."""
    results = []
    for node in nodes:
        async with KuboClient(node.info.api_url) as kubo:
            results.append(await publish_model(kubo, shards, part_size=MB))
    assert len({r.manifest_cid for r in results}) == 1
    return results[0]


def test_three_providers_serve_parts_in_parallel_and_the_file_is_exact(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", {"stage0/w.bin": PARTS * MB})
    provs = [kubo_nodes(f"p{i}") for i in range(3)]
    worker = kubo_nodes("w")
    out = tmp_path / "out"

    async def main() -> FetchResult:
        published = await _publish_on(provs, shards)
        async with KuboClient(worker.info.api_url) as kw:
            return await fetch_model(
                kw, published.manifest_cid, out, providers=[p.info.gateway_url for p in provs], part_timeout_s=30
            )

    result = asyncio.run(main())
    assert (out / "stage0/w.bin").read_bytes() == (shards / "stage0/w.bin").read_bytes()
    assert (out / "manifest.json").read_bytes() == (shards / "manifest.json").read_bytes()
    by_name = {s.name: s for s in result.sources}
    assert set(by_name) == {p.info.gateway_url for p in provs}  # no bitswap source: every part straight
    assert all(s.parts >= 3 and s.failure is None for s in result.sources), result.sources
    assert sum(s.parts for s in result.sources) == PARTS + 1 and result.parts_repeated == 0
    assert _no_partials(out)


def test_provider_killed_mid_fetch_costs_only_its_parts(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", {"w.bin": PARTS * MB})
    provs = [kubo_nodes(f"p{i}") for i in range(3)]
    worker = kubo_nodes("w")
    out = tmp_path / "out"
    killed_at: list[int] = []

    def progress(done: int, total: int) -> None:
        # A quarter in, while most parts are still to be handed out: the dead provider is asked
        # again and fails. (Killed at half, it once had only parts already in its socket buffer
        # left, delivered them, and was never asked again: no failure to see.)
        if not killed_at and done >= total // 4:
            provs[0].kill()  # daemon and Kubo child, SIGKILL, mid-fetch
            killed_at.append(done)

    async def main() -> FetchResult:
        published = await _publish_on(provs, shards)
        async with KuboClient(worker.info.api_url) as kw:
            return await fetch_model(
                kw,
                published.manifest_cid,
                out,
                providers=[p.info.gateway_url for p in provs],
                part_timeout_s=30,
                progress=progress,
            )

    started = time.monotonic()
    result = asyncio.run(main())
    print(f"fetch with a provider killed: {time.monotonic() - started:.1f}s, {result.sources}")
    assert killed_at and (out / "w.bin").read_bytes() == (shards / "w.bin").read_bytes()
    dead, *alive = result.sources
    assert dead.name == provs[0].info.gateway_url and dead.failure is not None
    assert dead.parts >= 1  # what it delivered before it died was kept
    assert all(s.failure is None for s in alive)
    # Only the parts it had in flight (two streams at most) were fetched again.
    assert 1 <= result.parts_repeated <= 2
    assert sum(s.parts for s in result.sources) == PARTS + 1
    assert _no_partials(out)


@pytest.mark.parametrize("via", ["gateway", "swarm"])
def test_part_whose_index_sha256_does_not_match_is_refused(kubo_nodes: NodeFactory, tmp_path: Path, via: str) -> None:
    shards = write_shards(tmp_path / "shards", {"w.bin": 3 * MB})
    a, b = kubo_nodes("a"), kubo_nodes("b")
    out = tmp_path / "out"

    async def main() -> None:
        async with KuboClient(a.info.api_url) as ka, KuboClient(b.info.api_url) as kb:
            published = await publish_model(ka, shards, part_size=MB)
            doc = json.loads(await ka.cat_bytes(published.manifest_cid))
            doc["files"][0]["parts"][1]["sha256"] = hashlib.sha256(b"other bytes").hexdigest()
            tampered = tmp_path / "tampered.json"
            tampered.write_bytes(Publication.model_validate(doc).to_bytes())
            tampered_cid = (await ka.add_file(tampered)).cid
            providers = [a.info.gateway_url] if via == "gateway" else list(a.info.multiaddrs)
            with pytest.raises(ShardIntegrityError) as info:
                await fetch_model(kb, tampered_cid, out, providers=providers, part_timeout_s=30)
            print(info.value)
            # Both ways every block was checked against its CID: the bytes are the CID's, so the
            # index is what is wrong. Fetched twice, then refused.
            assert "w.bin arrived corrupt twice (part 1 of 3" in str(info.value)
            assert "the index lists other bytes than its CID holds" in str(info.value)

    asyncio.run(main())
    assert not (out / "w.bin").exists() and not (out / "manifest.json").exists()
    assert _no_partials(out)


def test_an_rpc_url_given_as_provider_is_refused(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards", {"w.bin": MB})
    a, w = kubo_nodes("a"), kubo_nodes("w")

    async def main() -> None:
        published = await _publish_on([a], shards)
        async with KuboClient(w.info.api_url) as kw:
            with pytest.raises(ProviderError, match=r"is a Kubo RPC API .* Pass the provider's gateway URL"):
                await fetch_model(kw, published.manifest_cid, tmp_path / "out", providers=[a.info.api_url])

    asyncio.run(main())
    assert not (tmp_path / "out").exists()


def test_a_gateway_does_not_fetch_what_its_node_lacks(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    """NoFetch: B is connected to A, which holds the file; B's gateway still answers 404 at once
    for it and B's block store stays without it. Once B's own node fetched it (RPC, bitswap from A),
    B's gateway serves it: the 404 was B's gateway refusing to fetch, not B being cut off."""
    data = tmp_path / "f.bin"
    data.write_bytes(b"only A holds this " * 60_000)  # ~1 MB: a root and 5 leaves
    a, b = kubo_nodes("a"), kubo_nodes("b")

    async def status(url: str, fmt: str) -> tuple[int, float]:
        started = time.monotonic()
        async with aiohttp.ClientSession() as http, http.get(url, params={"format": fmt}) as response:
            await response.read()
            return response.status, time.monotonic() - started

    async def main() -> tuple[list[tuple[int, float]], bool, int]:
        async with KuboClient(a.info.api_url) as ka, KuboClient(b.info.api_url) as kb:
            cid = (await ka.add_file(data)).cid
            await kb.swarm_connect(a.info.multiaddrs[0])
            url = f"{b.info.gateway_url}/ipfs/{cid}"
            answers = [await status(url, "raw"), await status(url, "car")]
            await asyncio.sleep(2)  # time for a fetch in the background, were one started
            held = FlatfsBlocks(b.config.repo / "blocks").get(Cid.parse(cid)) is not None
            answers.append(await status(url, "car"))
            assert await kb.cat_bytes(cid, timeout_s=30) == data.read_bytes()  # B's node can get it
            return answers, held, (await status(url, "car"))[0]

    answers, held_after, served_later = asyncio.run(main())
    print(f"B's gateway for A's CID: {answers}")
    assert all(code == 404 and seconds < 2 for code, seconds in answers)
    assert not held_after
    assert served_later == 200


def test_gateways_alone_serve_a_fetch_without_an_ipfs_node_of_its_own(
    kubo_nodes: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fetch_shards` with gateway providers only (how `make demo`'s workers fetch) starts no
    embedded IPFS node for the call: the gateways serve every part. When none answers, it starts
    one (its own node might find the content) and fails clearly."""
    from dlis_market.settings import Settings
    from dlis_market.storage.errors import ContentTimeoutError
    from dlis_market.storage.shard_store import fetch_shards

    shards = write_shards(tmp_path / "shards", {"stage0/w.bin": 3 * MB})
    a = kubo_nodes("a")
    settings = Settings.load({"home": tmp_path / "home", "storage": {"fetch_timeout_s": 3}}, environ={})
    started: list[Path] = []
    real_start = EmbeddedDaemon.start

    def counting_start(self: EmbeddedDaemon) -> object:
        started.append(self.config.repo)
        return real_start(self)

    monkeypatch.setattr(EmbeddedDaemon, "start", counting_start)

    async def main() -> None:
        published = await _publish_on([a], shards)
        result = await fetch_shards(settings, published.manifest_cid, tmp_path / "out", providers=[a.info.gateway_url])
        assert [s.name for s in result.sources] == [a.info.gateway_url]
        assert started == []  # no node of its own for the call
        dead = "http://127.0.0.1:9"  # nothing listens there
        with pytest.raises(ContentTimeoutError, match=published.manifest_cid):
            await fetch_shards(settings, published.manifest_cid, tmp_path / "out2", providers=[dead])
        assert started == [settings.home / "ipfs"]  # then it tried with one of its own

    asyncio.run(main())
    assert (tmp_path / "out" / "stage0/w.bin").read_bytes() == (shards / "stage0/w.bin").read_bytes()
