"""`brownie run deploy`: deploy and wire the market's contracts, then write the deployment manifest.

Works on brownie's ``development`` network (brownie starts a throwaway Anvil) and on a lasting
local chain (``dlis chain up`` starts Anvil with persisted state and adds the brownie network
``dlis-anvil-<port>``). The sequence itself is ``dlis_market.chain.deploy.deploy_market``; the
manifest goes to ``$DLIS_HOME/deployments/<chain id>.json`` (default ``~/.dlis``), and
``brownie console`` reads it back with ``m = run("dlis")`` (``scripts/dlis.py``).

Role addresses (treasury, broker, oracle) and the deployer account come from, in this order: the
environment (``DLIS_CHAIN__TREASURY_ADDRESS``, ``..._BROKER_ADDRESS``, ``..._ORACLE_ADDRESS``,
``DLIS_CHAIN__DEPLOYER_ACCOUNT``), the ``dlis:`` section of ``brownie-config.yaml``, and on dev
chains the public dev accounts.
"""

from __future__ import annotations

import threading
from typing import Any

import brownie
from brownie import accounts, chain, config, network

from dlis_market.chain.deploy import Roles, deploy_market
from dlis_market.chain.deployment import DeployedContract, Deployment, write_deployment
from dlis_market.settings import DEV_CHAIN_IDS, Settings


class BrownieDeployer:
    """Deploys through brownie's contract containers (its compiler output, its accounts)."""

    def __init__(self, account: Any):
        self.account = account
        self.chain_id = chain.id
        self._live: dict[str, Any] = {}

    def deploy(self, name: str, *args: Any) -> DeployedContract:
        contract = getattr(brownie, name).deploy(*args, {"from": self.account})
        self._live[contract.address] = contract
        return DeployedContract(address=contract.address, block=contract.tx.block_number, abi=contract.abi)

    def transact(self, contract: DeployedContract, fn: str, *args: Any) -> None:
        getattr(self._live[contract.address], fn)(*args, {"from": self.account})

    def call(self, contract: DeployedContract, fn: str, *args: Any) -> Any:
        return getattr(self._live[contract.address], fn)(*args)


def _configured(settings: Settings) -> dict[str, str | None]:
    """Each role from the environment, else from brownie-config.yaml's ``dlis:`` section."""
    cfg, section = settings.chain, (config.get("dlis") or {})
    return {
        "deployer_account": cfg.deployer_account or section.get("deployer_account"),
        "treasury": cfg.treasury_address or section.get("treasury"),
        "broker": cfg.broker_address or section.get("broker"),
        "oracle": cfg.oracle_address or section.get("oracle"),
    }


def _roles(settings: Settings) -> tuple[Any, Roles]:
    given = _configured(settings)
    if chain.id in DEV_CHAIN_IDS:
        deployer = accounts[0]
        return deployer, Roles(
            deployer=deployer.address,
            treasury=given["treasury"] or deployer.address,
            broker=given["broker"] or accounts[1].address,
            oracle=given["oracle"] or accounts[2].address,
        )
    names = {
        "deployer_account": "DLIS_CHAIN__DEPLOYER_ACCOUNT",
        "treasury": "DLIS_CHAIN__TREASURY_ADDRESS",
        "broker": "DLIS_CHAIN__BROKER_ADDRESS",
        "oracle": "DLIS_CHAIN__ORACLE_ADDRESS",
    }
    missing = [f"{env} (or dlis.{key} in brownie-config.yaml)" for key, env in names.items() if not given[key]]
    if missing:
        raise SystemExit(
            f"chain id {chain.id} is not a dev chain: set {', '.join(missing)} before deploying "
            "(the public dev accounts are refused off dev chains)"
        )
    deployer = accounts.load(given["deployer_account"])
    return deployer, Roles(deployer.address, str(given["treasury"]), str(given["broker"]), str(given["oracle"]))


def _quiet_brownie_record_error() -> None:
    """Brownie 1.22's compiled ``_add_deployment`` raises ``TypeError: dict object expected; got
    Sources`` in a background thread for every contract deployed on a live network, printing a
    traceback each time; the deployment itself is fine and the dlis manifest is its record. Say
    it once in one line instead of four tracebacks."""
    previous, said = threading.excepthook, []

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is TypeError and "got brownie.project.sources.Sources" in str(args.exc_value):
            if not said:
                said.append(True)
                print("note: brownie could not record the deployment in its own database (a known brownie 1.22 bug);")
                print("      the dlis deployment manifest below is the record (`brownie console`: m = run('dlis'))")
            return
        previous(args)

    threading.excepthook = hook


def main() -> Deployment:
    settings = Settings.load()
    _quiet_brownie_record_error()
    deployer, roles = _roles(settings)
    print(f"deploying to chain {chain.id} ({network.show_active()}) from {deployer.address}")
    deployment = deploy_market(BrownieDeployer(deployer), settings.chain, roles)
    path = write_deployment(settings.deployments_dir, deployment)
    print(f"deployment manifest: {path}")
    for name, c in deployment.contracts.items():
        print(f"  {name:17s} {c.address}  (block {c.block})")
    return deployment
