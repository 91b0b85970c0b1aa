"""A worker fetches only the shards of the layers it serves (plus config and tokenizer files)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import typer
from kubo_helpers import NodeFactory, tiny_llama_folder  # type: ignore[import-not-found]
from typer.testing import CliRunner

from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import Stage
from dlis_market.storage.client import KuboClient
from dlis_market.storage.errors import LayerSelectionError
from dlis_market.storage.fetch import FetchResult, fetch_model
from dlis_market.storage.publish import publish_model
from dlis_market.types import LayerRange

# 4 layers in three stages: [0, 2), [2, 3), [3, 4).
STAGE_FILES = (
    "stage-00-layers-0-2.safetensors",
    "stage-01-layers-2-3.safetensors",
    "stage-02-layers-3-4.safetensors",
)


@pytest.fixture
def published(kubo_nodes: NodeFactory, tmp_path: Path) -> tuple[str, Path, list[str], str]:
    """(manifest CID, shard folder, provider multiaddrs, fetcher API URL) on two real nodes."""
    shards = tmp_path / "shards"
    export_shards(tiny_llama_folder(tmp_path / "hf"), shards, stages=3, dtype="bf16", name="tiny-llama")
    a, b = kubo_nodes("a"), kubo_nodes("b")

    async def publish() -> str:
        async with KuboClient(a.info.api_url) as ka:
            return (await publish_model(ka, shards)).manifest_cid

    return asyncio.run(publish()), shards, list(a.info.multiaddrs), b.info.api_url


def _fetch(published: tuple[str, Path, list[str], str], out: Path, layers: LayerRange) -> FetchResult:
    cid, _, providers, api_url = published

    async def main() -> FetchResult:
        async with KuboClient(api_url) as kb:
            return await fetch_model(kb, cid, out, providers=providers, layers=layers, part_timeout_s=30)

    return asyncio.run(main())


def _stage_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("stage-*"))


def test_fetch_of_one_stage_takes_only_its_shard_and_loads(
    published: tuple[str, Path, list[str], str], tmp_path: Path
) -> None:
    out = tmp_path / "worker"
    result = _fetch(published, out, LayerRange(start=2, end=3))
    assert _stage_files(out) == [STAGE_FILES[1]]
    shards = published[1]
    shared = {p.name for p in shards.iterdir() if not p.name.startswith("stage-")} - {"manifest.json"}
    assert "config.json" in shared
    assert {p.name for p in result.files} == {STAGE_FILES[1], *shared}
    fetched = [*result.files, result.manifest_path]
    assert result.downloaded_bytes == sum((shards / p.name).stat().st_size for p in fetched)
    assert (out / "manifest.json").read_bytes() == (shards / "manifest.json").read_bytes()
    stage = Stage.load(out, layers=LayerRange(start=2, end=3))  # verifies config + its own shard
    assert stage.layers == LayerRange(start=2, end=3)


def test_range_across_stages_takes_each_overlapping_shard(
    published: tuple[str, Path, list[str], str], tmp_path: Path
) -> None:
    out = tmp_path / "worker"
    _fetch(published, out, LayerRange(start=1, end=3))
    assert _stage_files(out) == list(STAGE_FILES[:2])
    # A later full fetch into the same folder reuses what is there and adds the rest.
    cid, _, providers, api_url = published

    async def full() -> FetchResult:
        async with KuboClient(api_url) as kb:
            return await fetch_model(kb, cid, out, providers=providers, part_timeout_s=30)

    result = asyncio.run(full())
    assert _stage_files(out) == list(STAGE_FILES)
    assert result.reused_bytes > 0


def test_range_beyond_the_model_is_refused_before_any_shard(
    published: tuple[str, Path, list[str], str], tmp_path: Path
) -> None:
    out = tmp_path / "worker"
    with pytest.raises(LayerSelectionError, match=r"\[3, 9\).*4 layers.*\[0, 2\), \[2, 3\), \[3, 4\)"):
        _fetch(published, out, LayerRange(start=3, end=9))
    assert not any(out.rglob("*.safetensors")) and not (out / "manifest.json").exists()


def test_cli_fetch_layers(published: tuple[str, Path, list[str], str], tmp_path: Path) -> None:
    from dlis_market.cli.model_store import register

    cid, _, providers, api_url = published
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    env = {"DLIS_HOME": str(tmp_path / "home"), "DLIS_STORAGE__KUBO_API_URL": api_url}
    base = ["fetch", cid, "--provider", providers[0], "--json", "--no-cache"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "w0"), "--layers", "0:2"], env=env)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["layers"] == [0, 2] and out["files"] == 3  # stage 0, config.json, generation_config.json
    assert _stage_files(tmp_path / "w0") == [STAGE_FILES[0]]

    result = runner.invoke(app, [*base, "--out", str(tmp_path / "w1"), "--layers", "2-3"], env=env)
    assert result.exit_code != 0
    assert "START:END" in result.output
