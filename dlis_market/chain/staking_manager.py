"""Binding of contracts/StakingManager.sol."""

from __future__ import annotations

from dataclasses import dataclass

from eth_account.signers.local import LocalAccount
from web3.types import TxReceipt

from dlis_market.chain.client import ChainClient
from dlis_market.chain.dlis_token import DLISToken, fmt_units
from dlis_market.chain.errors import PreflightError


@dataclass(frozen=True)
class StakeInfo:
    operator: str
    active: int
    unbonding: int
    release_time: int
    is_active: bool
    min_stake: int


class StakingManager:
    def __init__(self, client: ChainClient):
        self.client = client
        self.contract = client.contract("StakingManager")
        self.address = self.contract.address
        self.token = DLISToken(client)

    def min_stake(self) -> int:
        return int(self.contract.functions.minStake().call())

    def info(self, operator: str) -> StakeInfo:
        f = self.contract.functions
        unbonding, release = f.unbondingOf(operator).call()
        return StakeInfo(
            operator=operator,
            active=int(f.activeStake(operator).call()),
            unbonding=int(unbonding),
            release_time=int(release),
            is_active=bool(f.isActive(operator).call()),
            min_stake=self.min_stake(),
        )

    def stake(self, operator: LocalAccount, amount: int) -> TxReceipt:
        if amount <= 0:
            raise PreflightError(f"stake amount must be positive, got {amount}")
        self.token.require_balance(operator.address, amount)
        self.token.ensure_allowance(operator, self.address, amount)
        return self.client.transact(operator, self.contract.functions.stake(amount))

    def request_unstake(self, operator: LocalAccount, amount: int) -> TxReceipt:
        info = self.info(operator.address)
        if amount <= 0 or amount > info.active:
            raise PreflightError(
                f"cannot unstake {fmt_units(amount)} DLIS: active stake is {fmt_units(info.active)}; "
                "request an amount between 0 and your active stake"
            )
        return self.client.transact(operator, self.contract.functions.requestUnstake(amount))

    def withdraw(self, operator: LocalAccount) -> TxReceipt:
        info = self.info(operator.address)
        if info.unbonding == 0:
            raise PreflightError("nothing is unbonding; run `dlis node unstake AMOUNT` first")
        now = self.client.timestamp()
        if now < info.release_time:
            raise PreflightError(
                f"{fmt_units(info.unbonding)} DLIS unbonds at {info.release_time} (chain time now {now}, "
                f"{info.release_time - now} s left); withdraw after that"
            )
        return self.client.transact(operator, self.contract.functions.withdraw())

    def slash(
        self, slasher: LocalAccount, operator: str, amount: int, evidence_hash: bytes, reporter: str
    ) -> TxReceipt:
        return self.client.transact(slasher, self.contract.functions.slash(operator, amount, evidence_hash, reporter))

    def claimable(self, account: str) -> int:
        return int(self.contract.functions.claimableOf(account).call())

    def claim(self, account: LocalAccount) -> TxReceipt:
        return self.client.transact(account, self.contract.functions.claim())
