"""`dlis node start` argument handling (no worker is started: every case is refused before that)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dlis_market.cli import worker


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Root."""

    worker.register(app)
    return app


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shards", "."], "exactly one of --layers START:END or --auto"),
        (["--shards", ".", "--layers", "0:2", "--auto"], "exactly one of --layers START:END or --auto"),
        (["--layers", "0:2"], "exactly one of --shards DIR or --manifest-cid CID"),
        (["--shards", ".", "--layers", "2:1"], "START:END"),
    ],
)
def test_start_refuses_inconsistent_flags(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["start", *args], env={"DLIS_HOME": str(tmp_path)})
    assert result.exit_code == 1
    assert message in result.output


def test_start_is_mounted_with_its_options() -> None:
    result = CliRunner().invoke(_app(), ["start", "--help"])
    assert result.exit_code == 0
    for flag in ("--layers", "--auto", "--manifest-cid", "--initial-peer", "--price", "--market", "--registry"):
        assert flag in result.output


def test_start_takes_contract_addresses_from_the_deployment_manifest(tmp_path: Path) -> None:
    """A worker started without --market/--registry used to sign receipts and attestations for
    the zero address (wrong EIP-712 domains, so nothing it signed settled). It now reads them from
    the chain's deployment manifest, as every other command does; flags still win."""
    from dlis_market.chain.deployment import DeployedContract, Deployment, write_deployment
    from dlis_market.settings import Settings

    contracts = {
        name: DeployedContract(address="0x" + f"{i + 1:02x}" * 20, block=1, abi=[])
        for i, name in enumerate(["DLISToken", "StakingManager", "NodeRegistry", "ReputationOracle", "JobMarket"])
    }
    zero = "0x" + "00" * 20
    dep = Deployment(chain_id=31337, deployer=zero, treasury=zero, broker=zero, oracle=zero, contracts=contracts)
    settings = Settings.load(environ={"DLIS_HOME": str(tmp_path)})
    write_deployment(settings.deployments_dir, dep)
    filled = worker.with_deployment(settings)
    assert filled.node.market_address == contracts["JobMarket"].address
    assert filled.node.registry_address == contracts["NodeRegistry"].address
    assert filled.node.reputation_address == contracts["ReputationOracle"].address
    flagged = worker._merge(settings, "node", {"market_address": "0x" + "99" * 20})
    assert worker.with_deployment(flagged).node.market_address == "0x" + "99" * 20
    assert (
        worker.with_deployment(Settings.load(environ={"DLIS_HOME": str(tmp_path / "none")})).node.market_address == zero
    )
