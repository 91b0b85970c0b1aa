"""`brownie run deploy`: deploy and wire the market's contracts, then write the deployment manifest.

Works on brownie's ``development`` network (brownie starts a throwaway Anvil) and on a lasting
local chain (``dlis chain up`` starts Anvil with persisted state and adds the brownie network
``dlis-anvil-<port>``). The sequence itself is ``dlis_market.chain.deploy.deploy_market``; the
manifest goes to ``$DLIS_HOME/deployments/<chain id>.json`` (default ``~/.dlis``).
"""

from __future__ import annotations

from typing import Any

import brownie
from brownie import accounts, chain, network

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


def _roles(settings: Settings) -> tuple[Any, Roles]:
    cfg = settings.chain
    if chain.id in DEV_CHAIN_IDS:
        deployer = accounts[0]
        return deployer, Roles(
            deployer=deployer.address,
            treasury=cfg.treasury_address or deployer.address,
            broker=cfg.broker_address or accounts[1].address,
            oracle=cfg.oracle_address or accounts[2].address,
        )
    required = {
        "DLIS_CHAIN__DEPLOYER_ACCOUNT": cfg.deployer_account,
        "DLIS_CHAIN__TREASURY_ADDRESS": cfg.treasury_address,
        "DLIS_CHAIN__BROKER_ADDRESS": cfg.broker_address,
        "DLIS_CHAIN__ORACLE_ADDRESS": cfg.oracle_address,
    }
    missing = [k for k, v in required.items() if not v]
    if missing:
        raise SystemExit(
            f"chain id {chain.id} is not a dev chain: set {', '.join(missing)} before deploying "
            "(the public dev accounts are refused off dev chains)"
        )
    deployer = accounts.load(cfg.deployer_account)
    return deployer, Roles(
        deployer.address, str(cfg.treasury_address), str(cfg.broker_address), str(cfg.oracle_address)
    )


def main() -> Deployment:
    settings = Settings.load()
    deployer, roles = _roles(settings)
    print(f"deploying to chain {chain.id} ({network.show_active()}) from {deployer.address}")
    deployment = deploy_market(BrownieDeployer(deployer), settings.chain, roles)
    path = write_deployment(settings.deployments_dir, deployment)
    print(f"deployment manifest: {path}")
    for name, c in deployment.contracts.items():
        print(f"  {name:17s} {c.address}  (block {c.block})")
    return deployment
