"""Binding of contracts/DLISToken.sol (ERC-20 + EIP-2612 permit)."""

from __future__ import annotations

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.types import TxReceipt

from dlis_market.chain.client import ChainClient
from dlis_market.chain.errors import PreflightError

DECIMALS = 18
UNIT = 10**DECIMALS


def to_units(amount: str | int | float) -> int:
    """Parse a human amount ("12.5") into integer token units without float rounding."""
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(str(amount))
    except InvalidOperation as exc:
        raise ValueError(f"amount {amount!r} is not a number") from exc
    if value < 0:
        raise ValueError(f"amount {amount} is negative")
    units = value * UNIT
    if units != units.to_integral_value():
        raise ValueError(f"amount {amount} has more than {DECIMALS} decimals")
    return int(units)


def fmt_units(units: int) -> str:
    """Format integer token units as a decimal string ("12.5")."""
    whole, frac = divmod(int(units), UNIT)
    if frac == 0:
        return str(whole)
    return f"{whole}.{frac:018d}".rstrip("0")


class DLISToken:
    def __init__(self, client: ChainClient):
        self.client = client
        self.contract = client.contract("DLISToken")
        self.address = self.contract.address

    def balance_of(self, account: str) -> int:
        return int(self.contract.functions.balanceOf(Web3.to_checksum_address(account)).call())

    def allowance(self, owner: str, spender: str) -> int:
        return int(self.contract.functions.allowance(owner, spender).call())

    def total_supply(self) -> int:
        return int(self.contract.functions.totalSupply().call())

    def transfer(self, sender: LocalAccount, to: str, amount: int) -> TxReceipt:
        self.require_balance(sender.address, amount)
        return self.client.transact(sender, self.contract.functions.transfer(Web3.to_checksum_address(to), amount))

    def approve(self, owner: LocalAccount, spender: str, amount: int) -> TxReceipt:
        return self.client.transact(owner, self.contract.functions.approve(spender, amount))

    def ensure_allowance(self, owner: LocalAccount, spender: str, amount: int) -> None:
        if self.allowance(owner.address, spender) < amount:
            self.approve(owner, spender, amount)

    def require_balance(self, account: str, amount: int) -> None:
        have = self.balance_of(account)
        if have < amount:
            raise PreflightError(
                f"{account} holds {fmt_units(have)} DLIS but {fmt_units(amount)} is needed; "
                "get tokens first (on a dev chain: `dlis chain faucet ADDRESS AMOUNT`)"
            )
