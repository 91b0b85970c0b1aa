"""`dlis model adapter publish|list` against a real embedded IPFS node."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch
from kubo_helpers import NodeFactory  # type: ignore[import-not-found]
from transformers import AutoModelForCausalLM, LlamaConfig
from typer.testing import CliRunner

from dlis_market.cli.main import app
from dlis_market.inference.adapter_training import train_tiny_adapter
from dlis_market.inference.adapters import ADAPTER_WEIGHTS, adapter_sha256
from dlis_market.inference.shard_export import export_shards
from dlis_market.storage.adapter_store import AdapterRecord, fetch_adapter
from dlis_market.storage.client import KuboClient


def _tiny_llama(path: Path, hidden: int) -> Path:
    config = LlamaConfig(
        vocab_size=96, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


async def _cat(url: str, cid: str) -> bytes:
    async with KuboClient(url) as client:
        return await client.cat_bytes(cid, timeout_s=30)


def test_publish_then_list_adapters(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    node = kubo_nodes("a")
    model = _tiny_llama(tmp_path / "model", hidden=32)
    export_shards(model, tmp_path / "shards", stages=2, dtype="fp32", name="tiny")
    adapter = tmp_path / "pirate"
    adapter_id = train_tiny_adapter(model, adapter, r=4, steps=2)
    runner = CliRunner()
    env = {"DLIS_HOME": str(tmp_path / "home"), "DLIS_STORAGE__KUBO_API_URL": node.info.api_url}

    result = runner.invoke(app, ["model", "adapter", "list", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []

    args = ["model", "adapter", "publish", str(adapter), "--base", str(tmp_path / "shards"), "--json", "--no-register"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["adapter_id"] == adapter_id == adapter_sha256(adapter)
    assert out["base_model"] == "tiny" and out["r"] == 4 and out["layers"] == [0, 1]
    assert out["model"] == "tiny:pirate" and out["registered_on_chain"] is False  # no chain here
    # The CID is the published index: it lists each file's CID, and those hold the files' bytes.
    index = json.loads(asyncio.run(_cat(node.info.api_url, out["cid"])))
    assert index["adapter_id"] == adapter_id and "cid" not in index
    weights = next(f for f in index["files"] if f["path"] == ADAPTER_WEIGHTS)
    assert asyncio.run(_cat(node.info.api_url, weights["cid"])) == (adapter / ADAPTER_WEIGHTS).read_bytes()

    result = runner.invoke(app, ["model", "adapter", "list", "--json", "--base", "tiny"], env=env)
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [(r["adapter_id"], r["cid"]) for r in listed] == [(adapter_id, out["cid"])]
    record = AdapterRecord.model_validate_json(Path(out["record"]).read_text())
    assert record.index_bytes() == asyncio.run(_cat(node.info.api_url, out["cid"]))

    # A worker fetches it by CID alone and gets the same adapter id.
    async def fetch() -> AdapterRecord:
        async with KuboClient(node.info.api_url) as client:
            return await fetch_adapter(client, out["cid"], tmp_path / "fetched")

    assert asyncio.run(fetch()).adapter_id == adapter_sha256(tmp_path / "fetched") == adapter_id

    # An adapter for another base shape is refused before anything is added, as JSON on stdout.
    wide = _tiny_llama(tmp_path / "wide", hidden=48)
    export_shards(wide, tmp_path / "wide-shards", stages=1, dtype="fp32", name="wide")
    args = ["model", "adapter", "publish", str(adapter), "--base", str(tmp_path / "wide-shards"), "--json"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["type"] == "AdapterMismatchError"
    result = runner.invoke(app, ["model", "adapter", "list", "--json"], env=env)
    assert len(json.loads(result.stdout)) == 1
