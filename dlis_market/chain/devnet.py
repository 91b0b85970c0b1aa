"""A throwaway local market: Anvil on a free port with the contracts deployed.

Used by the test fixtures, the benchmarks and the demo. It runs the same deployment sequence as
``brownie run deploy`` (``deploy_market``) on brownie's compiled artifacts.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from dlis_market.chain.accounts import dev_accounts
from dlis_market.chain.anvil import AnvilProcess, free_port
from dlis_market.chain.client import ChainClient, connect_web3
from dlis_market.chain.deploy import Roles, Web3Deployer, deploy_market
from dlis_market.chain.deployment import write_deployment
from dlis_market.chain.dlis_token import DLISToken
from dlis_market.chain.job_market import JobMarket
from dlis_market.chain.node_registry import Capability, DeviceClass, NodeRegistry
from dlis_market.chain.reputation_oracle import ReputationOracle
from dlis_market.chain.stage_proofs import StageProofRegistry
from dlis_market.chain.staking_manager import StakingManager
from dlis_market.settings import Settings


@dataclass
class LocalMarket:
    settings: Settings
    anvil: AnvilProcess
    client: ChainClient

    @property
    def accounts(self) -> tuple[LocalAccount, ...]:
        return dev_accounts(self.settings.chain.dev_mnemonic)

    @property
    def deployer(self) -> LocalAccount:
        return self.accounts[0]

    @property
    def broker(self) -> LocalAccount:
        return self.accounts[1]

    @property
    def oracle(self) -> LocalAccount:
        return self.accounts[2]

    def deployment_treasury(self) -> str:
        return self.client.deployment.treasury

    def token(self) -> DLISToken:
        return DLISToken(self.client)

    def staking(self) -> StakingManager:
        return StakingManager(self.client)

    def registry(self) -> NodeRegistry:
        return NodeRegistry(self.client)

    def market(self) -> JobMarket:
        return JobMarket(self.client)

    def reputation(self) -> ReputationOracle:
        return ReputationOracle(self.client)

    def stage_proofs(self) -> StageProofRegistry:
        return StageProofRegistry(self.client)

    def fund(self, to: str, amount: int) -> None:
        """Send DLIS from the deployer (which holds the initial supply)."""
        self.token().transfer(self.deployer, to, amount)

    def new_funded_account(self, tokens: int, eth_wei: int = 10**18) -> LocalAccount:
        account: LocalAccount = Account.from_key(secrets.token_bytes(32))
        self.client.transfer_eth(self.deployer, account.address, eth_wei)
        if tokens:
            self.fund(account.address, tokens)
        return account

    def enroll_node(
        self, operator: LocalAccount, stake: int | None = None, peer_id: str | None = None, endpoint: str | None = None
    ) -> LocalAccount:
        """Stake for ``operator`` (if needed) and register a fresh node key under it."""
        staking = self.staking()
        need = stake if stake is not None else staking.min_stake()
        if staking.info(operator.address).active < need:
            staking.stake(operator, need)
        node: LocalAccount = Account.from_key(secrets.token_bytes(32))
        registry = self.registry()
        deadline = self.client.timestamp() + 3600
        pid = peer_id or f"12D3KooW{secrets.token_hex(20)}"
        binding = registry.sign_binding(node, operator.address, pid, deadline)
        registry.register(
            operator,
            node.address,
            pid,
            endpoint or "/ip4/127.0.0.1/tcp/4001",
            Capability(8192, 100, 1000, DeviceClass.LAPTOP),
            b"\x00" * 32,
            binding,
            deadline,
        )
        return node

    def snapshot(self) -> str:
        return str(self.client.w3.provider.make_request("evm_snapshot", [])["result"])  # type: ignore[arg-type]

    def revert(self, snapshot_id: str) -> None:
        self.client.w3.provider.make_request("evm_revert", [snapshot_id])  # type: ignore[arg-type]

    def increase_time(self, seconds: int) -> None:
        self.client.w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
        self.client.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


@contextmanager
def local_market(
    home: Path, port: int | None = None, optimism: bool = False, **chain_overrides: object
) -> Iterator[LocalMarket]:
    """Start Anvil on 127.0.0.1 (``optimism``: in its OP-stack mode), deploy, write the manifest
    under ``home``; stop Anvil at exit."""
    anvil = AnvilProcess(port or free_port(), log_file=home / "anvil.log", optimism=optimism)
    home.mkdir(parents=True, exist_ok=True)
    anvil.start()
    try:
        settings = Settings.load(
            overrides={"home": home, "chain": {"rpc_url": anvil.rpc_url, **chain_overrides}}, environ={}
        )
        w3 = connect_web3(anvil.rpc_url)
        accts = dev_accounts(settings.chain.dev_mnemonic)
        roles = Roles(accts[0].address, accts[0].address, accts[1].address, accts[2].address)
        deployment = deploy_market(Web3Deployer(w3, accts[0]), settings.chain, roles)
        write_deployment(settings.deployments_dir, deployment)
        yield LocalMarket(settings, anvil, ChainClient(settings, w3=w3, deployment=deployment))
    finally:
        anvil.stop()
