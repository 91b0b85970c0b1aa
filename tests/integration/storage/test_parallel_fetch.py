"""A shard fetched from several real IPFS nodes at once: parts spread over the providers, each
part checked, a provider killed mid-fetch costing only its parts, a wrong part sha256 refused."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest
from kubo_helpers import NodeFactory, write_shards  # type: ignore[import-not-found]

from dlis_market.storage.client import KuboClient
from dlis_market.storage.daemon import EmbeddedDaemon
from dlis_market.storage.errors import ShardIntegrityError
from dlis_market.storage.fetch import FetchResult, fetch_model
from dlis_market.storage.part_fetch import LOCAL_NODE
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
                kw, published.manifest_cid, out, providers=[p.info.api_url for p in provs], part_timeout_s=30
            )

    result = asyncio.run(main())
    assert (out / "stage0/w.bin").read_bytes() == (shards / "stage0/w.bin").read_bytes()
    assert (out / "manifest.json").read_bytes() == (shards / "manifest.json").read_bytes()
    by_name = {s.name: s for s in result.sources}
    assert set(by_name) == {p.info.api_url for p in provs}  # no bitswap source: every part straight
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
        if not killed_at and done >= total // 2:
            provs[0].kill()  # daemon and Kubo child, SIGKILL, mid-fetch
            killed_at.append(done)

    async def main() -> FetchResult:
        published = await _publish_on(provs, shards)
        async with KuboClient(worker.info.api_url) as kw:
            return await fetch_model(
                kw,
                published.manifest_cid,
                out,
                providers=[p.info.api_url for p in provs],
                part_timeout_s=30,
                progress=progress,
            )

    started = time.monotonic()
    result = asyncio.run(main())
    print(f"fetch with a provider killed: {time.monotonic() - started:.1f}s, {result.sources}")
    assert killed_at and (out / "w.bin").read_bytes() == (shards / "w.bin").read_bytes()
    dead, *alive = result.sources
    assert dead.name == provs[0].info.api_url and dead.failure is not None
    assert dead.parts >= 1  # what it delivered before it died was kept
    assert all(s.failure is None for s in alive)
    # Only the parts it had in flight (two streams at most) were fetched again.
    assert 1 <= result.parts_repeated <= 2
    assert sum(s.parts for s in result.sources) == PARTS + 1
    assert _no_partials(out)


@pytest.mark.parametrize("via", ["provider api", "swarm"])
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
            providers = [a.info.api_url] if via == "provider api" else list(a.info.multiaddrs)
            with pytest.raises(ShardIntegrityError) as info:
                await fetch_model(kb, tampered_cid, out, providers=providers, part_timeout_s=30)
            print(info.value)
            if via == "swarm":  # the worker's node checked every block by CID: fetched twice, refused
                assert "w.bin arrived corrupt twice (part 1 of 3" in str(info.value)
            else:  # the provider served other bytes than the index lists: dropped, nobody else has it
                assert "served wrong bytes for w.bin part 1" in str(info.value)
                assert LOCAL_NODE not in str(info.value)

    asyncio.run(main())
    assert not (out / "w.bin").exists() and not (out / "manifest.json").exists()
    assert _no_partials(out)
