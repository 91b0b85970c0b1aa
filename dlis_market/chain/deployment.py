"""The deployment manifest: where the market's contracts live on a chain.

Written by ``scripts/deploy.py`` (``brownie run deploy``) to
``$DLIS_HOME/deployments/<chain id>.json`` and read by every ``dlis`` command. It carries each
contract's address, deploy block and ABI, so the Python side needs nothing from brownie's build
folder and the explorer can decode events and calls.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from dlis_market.chain.errors import DeploymentNotFoundError

CONTRACT_NAMES = ("DLISToken", "StakingManager", "NodeRegistry", "ReputationOracle", "JobMarket")


class DeployedContract(BaseModel):
    model_config = ConfigDict(frozen=True)

    address: str
    block: int
    abi: list[dict[str, Any]]


class Deployment(BaseModel):
    model_config = ConfigDict(frozen=True)

    chain_id: int
    deployer: str
    treasury: str
    broker: str
    oracle: str
    contracts: dict[str, DeployedContract]

    @property
    def first_block(self) -> int:
        return min(c.block for c in self.contracts.values())

    def address_of(self, name: str) -> str:
        return self.contracts[name].address


def deployment_path(deployments_dir: Path, chain_id: int) -> Path:
    return deployments_dir / f"{chain_id}.json"


def write_deployment(deployments_dir: Path, deployment: Deployment) -> Path:
    """Write the manifest atomically (a crash never leaves a half-written file)."""
    deployments_dir.mkdir(parents=True, exist_ok=True)
    path = deployment_path(deployments_dir, deployment.chain_id)
    fd, tmp = tempfile.mkstemp(dir=deployments_dir, prefix=".deploy-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(deployment.model_dump(), fh, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def read_deployment(deployments_dir: Path, chain_id: int) -> Deployment:
    path = deployment_path(deployments_dir, chain_id)
    if not path.exists():
        raise DeploymentNotFoundError(
            f"no deployment for chain id {chain_id} at {path}; run `dlis chain up` (local Anvil) "
            "or `brownie run deploy --network <network>` first"
        )
    deployment = Deployment.model_validate_json(path.read_text())
    missing = [n for n in CONTRACT_NAMES if n not in deployment.contracts]
    if missing:
        raise DeploymentNotFoundError(f"deployment {path} lacks {', '.join(missing)}; redeploy")
    return deployment
