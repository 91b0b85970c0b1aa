"""`dlis model publish` registers the manifest in NodeRegistry on a real Anvil, and `dlis model fetch`
verifies the fetched manifest against what the chain registered."""

from __future__ import annotations

import json
from pathlib import Path

from kubo_helpers import NodeFactory, write_shards  # type: ignore[import-not-found]
from typer.testing import CliRunner

from dlis_market.cli.main import app
from dlis_market.types import model_id
from tests.integration.conftest import DEV_PUBLISHER


def _with_model_name(shards: Path, name: str) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["model_name"] = name
    (shards / "manifest.json").write_text(json.dumps(manifest))


def test_publish_registers_on_chain_and_fetch_checks_it(market, kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    a, b = kubo_nodes("a"), kubo_nodes("b")
    shards = write_shards(tmp_path / "shards", {"s0/w.bin": 200_000, "s1/w.bin": 100_000})
    _with_model_name(shards, "tiny-test")
    env = {
        "DLIS_HOME": str(market.settings.home),
        "DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url,
        "DLIS_STORAGE__KUBO_API_URL": a.info.api_url,
    }
    runner = CliRunner()
    result = runner.invoke(app, ["model", "publish", str(shards), "--json"], env=env)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["registered"] is True

    rec = market.registry().get_model(bytes.fromhex(model_id("tiny-test", DEV_PUBLISHER)[2:]))
    assert rec is not None
    assert rec.manifest_cid == out["manifest_cid"] and rec.manifest_sha256.hex() == out["manifest_sha256"]
    assert rec.num_layers == 2 and rec.publisher == market.deployer.address

    fetch_env = {**env, "DLIS_STORAGE__KUBO_API_URL": b.info.api_url}
    args = ["model", "fetch", out["manifest_cid"], "--out", str(tmp_path / "out"), "--provider", a.info.multiaddrs[0]]
    result = runner.invoke(app, [*args, "--json"], env=fetch_env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["verified_against_chain"] is True
    assert (tmp_path / "out" / "s0" / "w.bin").read_bytes() == (shards / "s0" / "w.bin").read_bytes()

    # The publisher registers a different manifest hash for the same CID: fetch refuses it.
    market.registry().publish_model(market.deployer, "tiny-test", out["manifest_cid"], b"\x42" * 32, 2)
    args = ["model", "fetch", out["manifest_cid"], "--out", str(tmp_path / "out2"), "--provider", a.info.multiaddrs[0]]
    result = runner.invoke(app, args, env=fetch_env)
    assert result.exit_code == 1
    assert "42" * 32 in result.output
    assert not (tmp_path / "out2" / "manifest.json").exists()
