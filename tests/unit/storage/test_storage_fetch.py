"""Publish and fetch logic against the in-process fake Kubo: verification, retry, cache, cleanup."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest

from dlis_market.storage.client import KuboClient
from dlis_market.storage.errors import ContentTimeoutError, ManifestError, ShardIntegrityError
from dlis_market.storage.fetch import ExpectedManifest, fetch_model
from dlis_market.storage.publication import Publication
from dlis_market.storage.publish import ModelRegistration, publish_model

from .fake_kubo import FakeState, fake_kubo


def make_shards(root: Path, sizes: dict[str, int]) -> Path:
    files = []
    for rel, size in sizes.items():
        data = os.urandom(size)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        files.append({"path": rel, "size": size, "sha256": hashlib.sha256(data).hexdigest()})
    (root / "manifest.json").write_text(json.dumps({"num_layers": 4, "stages": [{"files": files}]}))
    return root


def no_partials(out: Path) -> bool:
    return not any(p.name.endswith(".partial") for p in out.rglob("*"))


def test_publish_then_fetch_round_trip_with_parts_and_cache(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"s0/w.bin": 10_000, "s1/w.bin": 4_097, "empty.bin": 0})
    registered: list[ModelRegistration] = []

    async def main() -> None:
        async with fake_kubo() as (url, state), KuboClient(url) as kubo:
            result = await publish_model(kubo, shards, part_size=4096, register=registered.append)
            pub = Publication.from_bytes(state.blobs[result.manifest_cid])
            assert [len(f.parts) for f in pub.files] == [3, 2, 1]
            assert result.manifest_cid in state.pins and all(c in state.pins for c in state.blobs)
            seen: list[tuple[int, int]] = []
            fetched = await fetch_model(
                kubo,
                result.manifest_cid,
                tmp_path / "out",
                providers=["/ip4/127.0.0.1/tcp/1/p2p/QmA"],
                expected=ExpectedManifest(sha256=result.manifest_sha256, cid=result.manifest_cid),
                cache_dir=tmp_path / "cache",
                progress=lambda d, t: seen.append((d, t)),
            )
            assert state.connected == ["/ip4/127.0.0.1/tcp/1/p2p/QmA"]
            assert fetched.downloaded_bytes == result.total_bytes
            assert seen[-1][0] == seen[-1][1] == result.total_bytes
            # A second fetch into a new folder comes from the cache, with no cat of any shard part.
            calls = dict(state.cat_calls)
            again = await fetch_model(kubo, result.manifest_cid, tmp_path / "out2", cache_dir=tmp_path / "cache")
            assert again.reused_bytes == result.total_bytes and again.downloaded_bytes == 0
            assert sum(state.cat_calls.values()) == sum(calls.values()) + 1  # the index only

    asyncio.run(main())
    assert registered and registered[0].num_layers == 4
    for rel in ["s0/w.bin", "s1/w.bin", "empty.bin", "manifest.json"]:
        assert (tmp_path / "out" / rel).read_bytes() == (shards / rel).read_bytes()
        assert (tmp_path / "out2" / rel).read_bytes() == (shards / rel).read_bytes()
    assert no_partials(tmp_path / "out") and not (tmp_path / "out" / ".dlis-fetch").exists()


def test_corrupt_part_is_fetched_again_alone(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"w.bin": 9_000})

    async def main() -> None:
        async with fake_kubo() as (url, state), KuboClient(url) as kubo:
            result = await publish_model(kubo, shards, part_size=4096)
            parts = Publication.from_bytes(state.blobs[result.manifest_cid]).files[0].parts
            state.corrupt_once.add(parts[1].cid)
            fetched = await fetch_model(kubo, result.manifest_cid, tmp_path / "out")
            # Each part carries its sha256 (format 2): only the corrupt one is fetched again.
            assert [state.cat_calls[p.cid] for p in parts] == [1, 2, 1]
            assert fetched.parts_repeated == 1

    asyncio.run(main())
    assert (tmp_path / "out" / "w.bin").read_bytes() == (shards / "w.bin").read_bytes()


def test_format_1_index_is_still_read_and_a_corrupt_file_fetched_again_whole(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"w.bin": 9_000})

    async def main() -> None:
        async with fake_kubo() as (url, state), KuboClient(url) as kubo:
            result = await publish_model(kubo, shards, part_size=4096)
            doc = json.loads(state.blobs[result.manifest_cid])
            doc["format"] = "dlis-publication/1"
            for entry in [doc["manifest"], *doc["files"]]:
                for part in entry["parts"]:
                    del part["sha256"]
            v1 = Publication.from_bytes(json.dumps(doc).encode())
            assert not v1.parts_verifiable and b"sha256" not in json.dumps(doc["files"][0]["parts"]).encode()
            v1_cid = state.put(v1.to_bytes())
            parts = v1.files[0].parts
            state.corrupt_once.add(parts[1].cid)
            await fetch_model(kubo, v1_cid, tmp_path / "out")
            assert [state.cat_calls[p.cid] for p in parts] == [2, 2, 2]  # parts unchecked: whole file again

    asyncio.run(main())
    assert (tmp_path / "out" / "w.bin").read_bytes() == (shards / "w.bin").read_bytes()


def test_tampered_shard_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"a.bin": 3000, "b.bin": 3000})

    async def main() -> None:
        async with fake_kubo() as (url, state), KuboClient(url) as kubo:
            result = await publish_model(kubo, shards)
            pub = Publication.from_bytes(state.blobs[result.manifest_cid])
            evil_cid = state.put(b"\x00" * 3000)  # same size, other bytes
            doc = json.loads(pub.to_bytes())
            doc["files"][1]["parts"][0]["cid"] = evil_cid
            evil_index = state.put(Publication.model_validate(doc).to_bytes())
            with pytest.raises(ShardIntegrityError, match=r"b\.bin arrived corrupt twice"):
                await fetch_model(kubo, evil_index, tmp_path / "out")

    asyncio.run(main())
    out = tmp_path / "out"
    assert not (out / "b.bin").exists() and not (out / "manifest.json").exists()
    assert no_partials(out) and not (out / ".dlis-fetch").exists()


def test_manifest_checked_against_expected_sha256_and_cid(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"a.bin": 10})

    async def main() -> None:
        async with fake_kubo() as (url, _state), KuboClient(url) as kubo:
            result = await publish_model(kubo, shards)
            with pytest.raises(ManifestError, match="chain registers"):
                await fetch_model(kubo, result.manifest_cid, tmp_path / "o1", expected=ExpectedManifest("0" * 64))
            with pytest.raises(ManifestError, match="chain registers manifest CID"):
                await fetch_model(
                    kubo,
                    result.manifest_cid,
                    tmp_path / "o2",
                    expected=ExpectedManifest("0" * 64, cid="QmOther"),
                )

    asyncio.run(main())
    assert not (tmp_path / "o1" / "a.bin").exists()


def test_index_disagreeing_with_manifest_is_refused(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"a.bin": 10})

    async def main() -> None:
        async with fake_kubo() as (url, state), KuboClient(url) as kubo:
            result = await publish_model(kubo, shards)
            doc = json.loads(state.blobs[result.manifest_cid])
            extra = dict(doc["files"][0], path="extra.bin")
            doc["files"].append(extra)
            bad = state.put(Publication.model_validate(doc).to_bytes())
            with pytest.raises(ManifestError, match="does not list"):
                await fetch_model(kubo, bad, tmp_path / "out")

    asyncio.run(main())


def test_unknown_cid_times_out_clearly_and_reports_connect_errors(tmp_path: Path) -> None:
    async def main() -> None:
        state = FakeState(unreachable_peers={"/ip4/127.0.0.1/tcp/2/p2p/QmDown"})
        async with fake_kubo(state) as (url, _state), KuboClient(url, retries=0) as kubo:
            with pytest.raises(ContentTimeoutError, match=r"QmNobody.*not delivered.*QmDown"):
                await fetch_model(
                    kubo,
                    "QmNobody",
                    tmp_path / "out",
                    providers=["/ip4/127.0.0.1/tcp/2/p2p/QmDown"],
                    part_timeout_s=0.3,
                )

    asyncio.run(main())


def test_publish_refuses_folder_that_differs_from_manifest(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"a.bin": 10})
    (shards / "a.bin").write_bytes(b"y" * 10)

    async def main() -> None:
        async with fake_kubo() as (url, _state), KuboClient(url) as kubo:
            with pytest.raises(ShardIntegrityError, match="re-export"):
                await publish_model(kubo, shards)
            with pytest.raises(ManifestError, match=r"no manifest\.json"):
                await publish_model(kubo, tmp_path)

    asyncio.run(main())


def test_existing_verified_file_is_kept_and_stale_one_replaced(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards", {"a.bin": 100, "b.bin": 100})
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes((shards / "a.bin").read_bytes())
    (out / "b.bin").write_bytes(b"stale")

    async def main() -> None:
        async with fake_kubo() as (url, _state), KuboClient(url) as kubo:
            result = await publish_model(kubo, shards)
            fetched = await fetch_model(kubo, result.manifest_cid, out)
            assert fetched.reused_bytes == 100

    asyncio.run(main())
    assert (out / "b.bin").read_bytes() == (shards / "b.bin").read_bytes()


def test_shard_store_one_call_api_uses_settings(tmp_path: Path) -> None:
    from dlis_market.settings import Settings
    from dlis_market.storage.shard_store import cache_dir, fetch_shards, publish_shards

    shards = make_shards(tmp_path / "shards", {"a.bin": 5000})

    async def main() -> None:
        async with fake_kubo() as (url, state):
            settings = Settings.load(
                {"home": tmp_path / "home", "storage": {"kubo_api_url": url, "part_size_mb": 1, "peers": ["/p/QmX"]}},
                environ={},
            )
            published = await publish_shards(settings, shards)
            result = await fetch_shards(settings, published.manifest_cid, tmp_path / "out", providers=["/p/QmY"])
            assert state.connected == ["/p/QmY", "/p/QmX"]
            assert result.downloaded_bytes == published.total_bytes
            assert (cache_dir(settings) / "sha256").exists()

    asyncio.run(main())
    assert (tmp_path / "out" / "a.bin").read_bytes() == (shards / "a.bin").read_bytes()
