"""Connection to the chain: web3 provider, deployment, transactions and revert decoding.

Every state-changing call goes through :meth:`ChainClient.transact`, which first simulates the
call (``eth_estimateGas``); a revert there becomes a typed :class:`ContractRevertError` and no
transaction is sent. Transactions are signed locally by an ``eth_account`` key.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from eth_abi import decode as abi_decode
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from web3 import Web3
from web3.contract import Contract
from web3.contract.contract import ContractFunction
from web3.exceptions import ContractCustomError, ContractLogicError, TimeExhausted
from web3.types import Nonce, RPCEndpoint, TxReceipt

from dlis_market.chain.deployment import Deployment, read_deployment
from dlis_market.chain.errors import (
    REVERT_HINTS,
    ChainUnavailableError,
    ContractRevertError,
    TransactionFailedError,
    WrongChainError,
)
from dlis_market.settings import Settings


@dataclass(frozen=True)
class _ErrorAbi:
    contract: str
    name: str
    input_names: list[str]
    input_types: list[str]


def abi_type(inp: dict[str, Any]) -> str:
    """Canonical ABI type of an input (tuples spelled out, as in selectors)."""
    t = str(inp["type"])
    if t.startswith("tuple"):
        inner = ",".join(abi_type(c) for c in inp["components"])
        return f"({inner}){t[5:]}"
    return t


def connect_web3(rpc_url: str, timeout_s: float = 30.0) -> Web3:
    """A web3 connection to ``rpc_url`` that proved it answers. It keeps the node's chain id:
    web3's validation middleware asks for it before every eth_call, eth_estimateGas and
    eth_sendTransaction, which doubled the round trips of every contract read."""
    provider = Web3.HTTPProvider(
        rpc_url,
        request_kwargs={"timeout": timeout_s},
        cache_allowed_requests=True,
        cacheable_requests={RPCEndpoint("eth_chainId")},
    )
    w3 = Web3(provider)
    try:
        w3.eth.chain_id  # noqa: B018 - a real round trip proves the endpoint answers
    except Exception as exc:  # requests raises several unrelated types; all mean "unreachable"
        raise ChainUnavailableError(
            f"no JSON-RPC answer at {rpc_url} ({type(exc).__name__}); start a local chain with "
            "`dlis chain up` or pass --rpc-url / DLIS_CHAIN__RPC_URL"
        ) from exc
    return w3


_SEND_LOCKS: dict[str, threading.Lock] = {}
_SEND_LOCKS_GUARD = threading.Lock()


def _send_lock(address: str) -> threading.Lock:
    """This process's lock over one account's nonce sequence."""
    with _SEND_LOCKS_GUARD:
        return _SEND_LOCKS.setdefault(address.lower(), threading.Lock())


class ChainClient:
    """A web3 connection bound to one deployment of the market contracts."""

    def __init__(self, settings: Settings, w3: Web3 | None = None, deployment: Deployment | None = None):
        self.settings = settings
        self.w3 = w3 or connect_web3(settings.chain.rpc_url, settings.chain.tx_timeout_s)
        self.chain_id = int(self.w3.eth.chain_id)
        self.deployment = deployment or read_deployment(settings.deployments_dir, self.chain_id)
        if self.deployment.chain_id != self.chain_id:
            raise WrongChainError(
                f"deployment is for chain {self.deployment.chain_id} but {settings.chain.rpc_url} is chain "
                f"{self.chain_id}; point --rpc-url at the right chain"
            )
        self._contracts: dict[str, Contract] = {}
        self._errors: dict[bytes, _ErrorAbi] = {}
        for name, info in self.deployment.contracts.items():
            for item in info.abi:
                if item.get("type") != "error":
                    continue
                types = [abi_type(i) for i in item.get("inputs", [])]
                selector = keccak(text=f"{item['name']}({','.join(types)})")[:4]
                names = [i.get("name") or f"arg{k}" for k, i in enumerate(item.get("inputs", []))]
                self._errors.setdefault(selector, _ErrorAbi(name, item["name"], names, types))

    def model_publisher(self) -> str:
        """Whose model namespace to serve: ``chain.model_publisher``, else the deployment's deployer."""
        return Web3.to_checksum_address(self.settings.chain.model_publisher or self.deployment.deployer)

    # ------------------------------------------------------------------ contracts

    def contract(self, name: str) -> Contract:
        if name not in self._contracts:
            info = self.deployment.contracts[name]
            self._contracts[name] = self.w3.eth.contract(address=Web3.to_checksum_address(info.address), abi=info.abi)
        return self._contracts[name]

    # ------------------------------------------------------------------ reverts

    def decode_revert(self, data: str | bytes | None, fallback: str = "") -> ContractRevertError | None:
        if data is None:
            return None
        raw = bytes.fromhex(data[2:] if data.startswith("0x") else data) if isinstance(data, str) else data
        if len(raw) < 4:
            return None
        abi = self._errors.get(raw[:4])
        if abi is None:
            if raw[:4] == keccak(text="Error(string)")[:4]:
                (msg,) = abi_decode(["string"], raw[4:])
                return ContractRevertError(fallback or "contract", "Error", {"message": msg})
            return None
        values = abi_decode(abi.input_types, raw[4:])
        args = dict(zip(abi.input_names, values, strict=True))
        return ContractRevertError(abi.contract, abi.name, args, REVERT_HINTS.get(abi.name))

    def _raise_revert(self, exc: Exception, what: str) -> None:
        data = getattr(exc, "data", None)
        if isinstance(data, dict):
            data = data.get("data")
        decoded = self.decode_revert(data if isinstance(data, (str, bytes)) else None, fallback=what)
        if decoded is not None:
            raise decoded from exc
        raise TransactionFailedError(f"{what} reverted: {exc}") from exc

    # ------------------------------------------------------------------ calls and transactions

    def call(self, fn: ContractFunction, sender: str | None = None) -> Any:
        try:
            return fn.call({"from": sender} if sender else None)
        except (ContractCustomError, ContractLogicError) as exc:
            self._raise_revert(exc, fn.fn_name)
            raise  # unreachable: _raise_revert always raises

    def transact(self, account: LocalAccount, fn: ContractFunction, gas: int | None = None) -> TxReceipt:
        """Simulate, sign, send and wait for ``fn`` from ``account``; reverts raise before sending."""
        sender = account.address
        try:
            estimate = fn.estimate_gas({"from": sender})
        except (ContractCustomError, ContractLogicError) as exc:
            self._raise_revert(exc, fn.fn_name)
            raise
        tx = fn.build_transaction(
            {
                "from": sender,
                "nonce": Nonce(0),  # set by send_raw, under the account's send lock
                "gas": gas or int(estimate * 1.2) + 10_000,
                "chainId": self.chain_id,
            }
        )
        return self.send_raw(account, tx, fn.fn_name)

    def send_raw(self, account: LocalAccount, tx: Any, what: str) -> TxReceipt:
        """Sign ``tx`` with the account's next nonce, send it and wait for its receipt. The nonce is
        read, and the transaction sent, under a per-account lock of this process: threads that
        send from one account (the broker's settler and its proof recorder) never take the same."""
        with _send_lock(account.address):
            tx = {**tx, "nonce": self.w3.eth.get_transaction_count(account.address, "pending")}
            signed = account.sign_transaction(tx)
            tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        try:
            receipt = self.w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self.settings.chain.tx_timeout_s, poll_latency=0.05
            )
        except TimeExhausted as exc:
            raise TransactionFailedError(
                f"{what}: transaction 0x{tx_hash.hex()} not mined within {self.settings.chain.tx_timeout_s:.0f} s; "
                "is the chain producing blocks?"
            ) from exc
        if receipt["status"] != 1:
            raise TransactionFailedError(
                f"{what}: transaction 0x{tx_hash.hex()} reverted in block {receipt['blockNumber']}"
            )
        return receipt

    def transfer_eth(self, account: LocalAccount, to: str, wei: int) -> TxReceipt:
        tx = {
            "from": account.address,
            "to": Web3.to_checksum_address(to),
            "value": wei,
            "nonce": 0,  # set by send_raw
            "gas": 21_000,
            "gasPrice": self.w3.eth.gas_price,
            "chainId": self.chain_id,
        }
        return self.send_raw(account, tx, "ETH transfer")

    def timestamp(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def wait_for_chain(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.w3.is_connected():
                return
            time.sleep(0.1)
        raise ChainUnavailableError(f"chain at {self.settings.chain.rpc_url} did not answer within {timeout_s} s")
