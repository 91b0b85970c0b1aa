"""`dlis model publish|fetch` and `dlis ipfs id` on real embedded nodes."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from kubo_helpers import NodeFactory, write_shards  # type: ignore[import-not-found]
from typer.testing import CliRunner

from dlis_market.cli import ipfs
from dlis_market.cli.model_store import register
from dlis_market.settings import Settings
from dlis_market.storage.daemon import DaemonConfig, EmbeddedDaemon
from dlis_market.storage.fetch import ExpectedManifest
from dlis_market.storage.publish import ModelRegistration
from dlis_market.types import Cid


def test_publish_with_auto_daemon_then_fetch_via_cli(kubo_nodes: NodeFactory, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shards = write_shards(tmp_path / "shards", {"s0/w.bin": 300_000, "s1/w.bin": 200_000})
    chain: dict[str, ModelRegistration] = {}

    def on_published(settings: Settings, reg: ModelRegistration) -> None:
        chain[reg.manifest_cid] = reg

    def expected(settings: Settings, cid: Cid) -> ExpectedManifest | None:
        reg = chain.get(cid)
        return ExpectedManifest(reg.manifest_sha256, reg.manifest_cid) if reg else None

    app = typer.Typer()
    register(app, on_published=on_published, expected_manifest=expected)
    app.add_typer(ipfs.app, name="ipfs")
    runner = CliRunner()
    env = {"DLIS_HOME": str(home)}

    # No Kubo URL, no daemon running: publish starts an embedded one for the command.
    result = runner.invoke(app, ["publish", str(shards), "--json"], env=env)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["registered"] is True and out["num_layers"] == 2 and out["files"] == 2
    cid = out["manifest_cid"]
    assert cid in chain

    # The content stays pinned in HOME/ipfs: a daemon on that repo serves it.
    provider = EmbeddedDaemon(DaemonConfig(repo=home / "ipfs"))
    try:
        provider.start()
        result = runner.invoke(app, ["ipfs", "id", "--json"], env=env)  # finds the running daemon
        assert result.exit_code == 0, result.output
        ident = json.loads(result.stdout)
        assert ident["id"] == provider.info.peer_id and ident["gateway"] == provider.info.gateway_url

        b = kubo_nodes("b")
        fetch_env = {**env, "DLIS_STORAGE__KUBO_API_URL": b.info.api_url}
        # The provider's Kubo RPC URL is refused, naming what to pass instead.
        args = ["fetch", cid, "--out", str(tmp_path / "out"), "--provider", provider.info.api_url, "--json"]
        result = runner.invoke(app, args, env=fetch_env)
        assert result.exit_code == 1 and "gateway URL" in result.output, result.output
        # Its gateway URL, as `dlis ipfs id` printed it, is what a fetcher takes.
        args = ["fetch", cid, "--out", str(tmp_path / "out"), "--provider", ident["gateway"], "--json"]
        result = runner.invoke(app, args, env=fetch_env)
        assert result.exit_code == 0, result.output
        fetched = json.loads(result.stdout.strip().splitlines()[-1])
        assert fetched["verified_against_chain"] is True and fetched["files"] == 2
        for rel in ["s0/w.bin", "s1/w.bin", "manifest.json"]:
            assert (tmp_path / "out" / rel).read_bytes() == (shards / rel).read_bytes()

        # A wrong --expect-sha256 is refused with a clear message and exit code 1.
        chain.clear()
        args = ["fetch", cid, "--out", str(tmp_path / "out2"), "--expect-sha256", "0" * 64, "--timeout", "10"]
        args += ["--provider", ident["gateway"]]
        result = runner.invoke(app, args, env=fetch_env)
        assert result.exit_code == 1
        assert "chain registers" in result.output
    finally:
        provider.stop()


def test_ipfs_id_without_a_daemon_says_so_and_starts_none(tmp_path: Path) -> None:
    """`dlis ipfs id` answers about the node in use; with none running it must not boot a throwaway
    node (whose peer id would mean nothing) but say how to start one."""
    app = typer.Typer()
    app.add_typer(ipfs.app, name="ipfs")
    home = tmp_path / "home"
    result = CliRunner().invoke(app, ["ipfs", "id", "--json"], env={"DLIS_HOME": str(home)})
    assert result.exit_code == 1, result.output
    assert "no IPFS daemon is running" in result.output and "dlis ipfs daemon" in result.output
    assert not (home / "ipfs").exists()  # no repo was created, no node was started
