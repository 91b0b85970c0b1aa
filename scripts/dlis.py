"""`brownie console`'s view of the deployed market: ``m = run("dlis")`` then ``m.JobMarket.feeBps()``.

Brownie 1.22 cannot record deployments on live networks (see ``scripts/deploy.py``), so its
contract containers start empty in a console; this reads the dlis deployment manifest
(``$DLIS_HOME/deployments/<chain id>.json``, written by ``brownie run deploy``) and returns each
contract bound to its deployed address and ABI.
"""

from __future__ import annotations

from types import SimpleNamespace

from brownie import Contract, chain

from dlis_market.chain.deployment import read_deployment
from dlis_market.settings import Settings


def main() -> SimpleNamespace:
    settings = Settings.load()
    deployment = read_deployment(settings.deployments_dir, chain.id)
    market = SimpleNamespace(
        **{name: Contract.from_abi(name, c.address, c.abi) for name, c in deployment.contracts.items()}
    )
    print(f"chain {chain.id}: {', '.join(vars(market))} from {settings.deployments_dir}")
    return market
