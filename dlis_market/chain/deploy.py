"""The deployment sequence of the market, written once.

``scripts/deploy.py`` runs it through brownie (``brownie run deploy``); tests and tools that
already hold compiled artifacts run it through :class:`Web3Deployer`. Both give the same
contracts, parameters and roles, and a :class:`Deployment` manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.types import TxParams

from dlis_market.chain.anvil import REPO_ROOT
from dlis_market.chain.deployment import CONTRACT_NAMES, DeployedContract, Deployment
from dlis_market.chain.errors import DeploymentNotFoundError, PreflightError
from dlis_market.settings import ChainSettings


@dataclass(frozen=True)
class Roles:
    deployer: str
    treasury: str
    broker: str
    oracle: str


class Deployer(Protocol):
    chain_id: int

    def deploy(self, name: str, *args: Any) -> DeployedContract: ...

    def transact(self, contract: DeployedContract, fn: str, *args: Any) -> None: ...

    def call(self, contract: DeployedContract, fn: str, *args: Any) -> Any: ...


# Every contract deploy_market deploys (readers require only deployment.CONTRACT_NAMES of them).
DEPLOYED_CONTRACTS = (*CONTRACT_NAMES, "StageProofRegistry")


def deploy_market(deployer: Deployer, params: ChainSettings, roles: Roles) -> Deployment:
    if not 0 < params.max_authorization_lifetime_s < params.withdraw_delay_s:
        raise PreflightError(
            f"max_authorization_lifetime_s is {params.max_authorization_lifetime_s} s but must be above 0 and "
            f"below withdraw_delay_s ({params.withdraw_delay_s} s), so no authorization outlives the withdrawal "
            "delay; lower it or raise the delay"
        )
    if params.withdraw_window_s <= 0:
        raise PreflightError(f"withdraw_window_s is {params.withdraw_window_s} s; it must be at least 1")
    token = deployer.deploy("DLISToken", roles.deployer, params.initial_supply)
    staking = deployer.deploy(
        "StakingManager",
        token.address,
        roles.deployer,
        roles.treasury,
        params.min_stake,
        params.unbonding_period_s,
        params.reporter_share_bps,
    )
    registry = deployer.deploy("NodeRegistry", staking.address)
    reputation = deployer.deploy("ReputationOracle", roles.deployer)
    market = deployer.deploy(
        "JobMarket",
        token.address,
        registry.address,
        roles.deployer,
        roles.treasury,
        params.fee_bps,
        params.withdraw_delay_s,
        params.withdraw_window_s,
        params.max_authorization_lifetime_s,
    )
    deployer.transact(staking, "grantRole", deployer.call(staking, "SLASHER_ROLE"), roles.oracle)
    deployer.transact(reputation, "grantRole", deployer.call(reputation, "ORACLE_ROLE"), roles.oracle)
    deployer.transact(market, "grantRole", deployer.call(market, "BROKER_ROLE"), roles.broker)
    # stage proofs: the oracle registers the circuits whose keys the chain may trust, and so does the
    # broker, which sets each head circuit up itself from the public weights (broker/zk_onchain.py)
    proofs = deployer.deploy("StageProofRegistry", market.address, roles.deployer)
    circuit_admin = deployer.call(proofs, "CIRCUIT_ADMIN_ROLE")
    deployer.transact(proofs, "grantRole", circuit_admin, roles.oracle)
    deployer.transact(proofs, "grantRole", circuit_admin, roles.broker)
    return Deployment(
        chain_id=deployer.chain_id,
        deployer=roles.deployer,
        treasury=roles.treasury,
        broker=roles.broker,
        oracle=roles.oracle,
        contracts={
            "DLISToken": token,
            "StakingManager": staking,
            "NodeRegistry": registry,
            "ReputationOracle": reputation,
            "JobMarket": market,
            "StageProofRegistry": proofs,
        },
    )


def load_artifact(name: str, build_dir: Path | None = None) -> dict[str, Any]:
    path = (build_dir or REPO_ROOT / "build" / "contracts") / f"{name}.json"
    if not path.exists():
        raise DeploymentNotFoundError(f"compiled artifact {path} is missing; run `brownie compile` (make setup does)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


class Web3Deployer:
    """Deploys brownie's compiled artifacts with web3 from a local key."""

    def __init__(self, w3: Web3, account: LocalAccount, build_dir: Path | None = None):
        self.w3 = w3
        self.account = account
        self.build_dir = build_dir
        self.chain_id = int(w3.eth.chain_id)

    def _send(self, tx: dict[str, Any]) -> Any:
        tx.setdefault("from", self.account.address)
        tx["nonce"] = self.w3.eth.get_transaction_count(self.account.address, "pending")
        tx["chainId"] = self.chain_id
        tx.pop("gas", None)
        tx["gas"] = int(self.w3.eth.estimate_gas(cast(TxParams, tx)) * 1.2)
        signed = self.account.sign_transaction(tx)
        receipt = self.w3.eth.wait_for_transaction_receipt(self.w3.eth.send_raw_transaction(signed.raw_transaction))
        if receipt["status"] != 1:
            raise DeploymentNotFoundError(f"deployment transaction reverted: {receipt['transactionHash'].hex()}")
        return receipt

    def deploy(self, name: str, *args: Any) -> DeployedContract:
        art = load_artifact(name, self.build_dir)
        factory = self.w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        receipt = self._send(
            factory.constructor(*args).build_transaction({"from": self.account.address, "gas": 10_000_000})
        )
        return DeployedContract(address=receipt["contractAddress"], block=receipt["blockNumber"], abi=art["abi"])

    def transact(self, contract: DeployedContract, fn: str, *args: Any) -> None:
        c = self.w3.eth.contract(address=Web3.to_checksum_address(contract.address), abi=contract.abi)
        self._send(getattr(c.functions, fn)(*args).build_transaction({"from": self.account.address, "gas": 10_000_000}))

    def call(self, contract: DeployedContract, fn: str, *args: Any) -> Any:
        c = self.w3.eth.contract(address=Web3.to_checksum_address(contract.address), abi=contract.abi)
        return getattr(c.functions, fn)(*args).call()
