"""The same model, imported and exported on two machines, publishes under one manifest CID."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kubo_helpers import NodeFactory, tiny_llama_folder  # type: ignore[import-not-found]

from dlis_market.inference.importer import import_model
from dlis_market.inference.shard_export import export_shards
from dlis_market.storage.client import KuboClient
from dlis_market.storage.publish import publish_model


def test_same_model_on_two_machines_gets_one_manifest_and_cid(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    source = tiny_llama_folder(tmp_path / "download" / "tiny-llama")
    shard_dirs = []
    for machine in ("alice", "bob-with-a-longer-home"):
        home = tmp_path / machine / ".dlis"
        model_dir = import_model(str(source), home / "models", home / "cache", name="tiny-llama")
        out = home / "shards" / "tiny-llama"
        export_shards(model_dir, out, stages=2, dtype="bf16", name="tiny-llama")
        shard_dirs.append(out)
    a_dir, b_dir = shard_dirs
    manifest_a, manifest_b = (a_dir / "manifest.json").read_bytes(), (b_dir / "manifest.json").read_bytes()
    assert str(tmp_path).encode() not in manifest_a
    assert manifest_a == manifest_b
    assert (a_dir / "config.json").read_bytes() == (b_dir / "config.json").read_bytes()
    a, b = kubo_nodes("a"), kubo_nodes("b")

    async def main() -> tuple[str, str]:
        async with KuboClient(a.info.api_url) as ka, KuboClient(b.info.api_url) as kb:
            on_a = await publish_model(ka, a_dir)
            on_b = await publish_model(kb, b_dir)
            return on_a.manifest_cid, on_b.manifest_cid

    cid_a, cid_b = asyncio.run(main())
    assert cid_a == cid_b
