"""Thin JSON-RPC access for the explorer: standard ``eth_*`` methods plus Otterscan's ``ots_*``
and the tracing namespaces (``trace_*``/``debug_*``), as Anvil, Erigon and Reth offer them.

Answers are returned as the node sends them (hex strings). A method the node does not offer
raises :class:`MethodUnavailableError`, so pages can say "this node has no ots_* methods"
instead of failing.
"""

from __future__ import annotations

from typing import Any

from web3 import Web3

from dlis_market.errors import DlisError


class ExplorerError(DlisError):
    """Root of the explorer's errors."""


class RpcError(ExplorerError):
    def __init__(self, method: str, code: int | None, message: str):
        super().__init__(f"{method} failed: {message} (code {code})")
        self.method, self.code, self.message = method, code, message


class MethodUnavailableError(RpcError):
    """The node does not offer this method (JSON-RPC -32601 or an equivalent message)."""


_MISSING_HINTS = ("not found", "not supported", "does not exist", "unsupported", "not available", "unknown method")


def _is_missing(code: int | None, message: str) -> bool:
    return code == -32601 or any(h in message.lower() for h in _MISSING_HINTS)


class ExplorerRpc:
    """JSON-RPC calls over a web3 provider (any EVM node's HTTP endpoint)."""

    def __init__(self, w3: Web3):
        self.w3 = w3
        self._ots_checked = False
        self._ots_level: int | None = None

    def call(self, method: str, params: list[Any]) -> Any:
        answer: Any
        try:
            answer = self.w3.provider.make_request(method, params)  # type: ignore[arg-type]
        except ValueError as exc:  # some providers raise the node's error object as ValueError
            err = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {"message": str(exc)}
            answer = {"error": err}
        error = answer.get("error")
        if error:
            code = error.get("code") if isinstance(error, dict) else None
            message = str(error.get("message") if isinstance(error, dict) else error)
            if _is_missing(code, message):
                raise MethodUnavailableError(method, code, message)
            raise RpcError(method, code, message)
        return answer.get("result")

    # ------------------------------------------------------------------ standard

    def block_number(self) -> int:
        return int(self.call("eth_blockNumber", []), 16)

    def block(self, number: int | str, full: bool = True) -> dict[str, Any] | None:
        tag = hex(number) if isinstance(number, int) else number
        result: dict[str, Any] | None = self.call("eth_getBlockByNumber", [tag, full])
        return result

    def transaction(self, tx_hash: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.call("eth_getTransactionByHash", [tx_hash])
        return result

    def receipt(self, tx_hash: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.call("eth_getTransactionReceipt", [tx_hash])
        return result

    def balance(self, address: str) -> int:
        return int(self.call("eth_getBalance", [address, "latest"]), 16)

    def code(self, address: str) -> str:
        return str(self.call("eth_getCode", [address, "latest"]))

    def logs(self, addresses: list[str], from_block: int, to_block: int | str = "latest") -> list[dict[str, Any]]:
        to = hex(to_block) if isinstance(to_block, int) else to_block
        result: list[dict[str, Any]] = self.call(
            "eth_getLogs", [{"address": addresses, "fromBlock": hex(from_block), "toBlock": to}]
        )
        return result

    # ------------------------------------------------------------------ otterscan

    def ots_api_level(self) -> int | None:
        """Otterscan API level, or None when the node has no ``ots_*`` namespace (asked once)."""
        if not self._ots_checked:
            try:
                self._ots_level = int(self.call("ots_getApiLevel", []))
            except MethodUnavailableError:
                self._ots_level = None
            self._ots_checked = True
        return self._ots_level

    def address_history(self, address: str, page_size: int = 25) -> list[dict[str, Any]]:
        """Most recent transactions touching ``address`` (``ots_searchTransactionsBefore`` from the tip)."""
        result = self.call("ots_searchTransactionsBefore", [address, 0, page_size])
        txs: list[dict[str, Any]] = result.get("txs", [])
        receipts = {r["transactionHash"]: r for r in result.get("receipts", [])}
        for tx in txs:
            tx["receipt"] = receipts.get(tx["hash"])
        return txs

    def transaction_error(self, tx_hash: str) -> str:
        """Revert data of a failed transaction (``ots_getTransactionError``), ``0x`` if none."""
        return str(self.call("ots_getTransactionError", [tx_hash]) or "0x")

    # ------------------------------------------------------------------ traces

    def internal_calls(self, tx_hash: str) -> tuple[str, list[dict[str, Any]]]:
        """Call tree of a transaction flattened to rows, and the method that produced it:
        ``debug_traceTransaction`` (callTracer) first, then ``trace_transaction``."""
        try:
            tree = self.call("debug_traceTransaction", [tx_hash, {"tracer": "callTracer"}])
            rows: list[dict[str, Any]] = []
            _flatten(tree, 0, rows)
            return "debug_traceTransaction", rows
        except MethodUnavailableError:
            pass  # fall through to the parity-style tracer
        traces = self.call("trace_transaction", [tx_hash]) or []
        rows = []
        for t in traces:
            action = t.get("action", {})
            rows.append(
                {
                    "depth": len(t.get("traceAddress", [])),
                    "type": str(action.get("callType") or t.get("type", "")).upper(),
                    "from": action.get("from"),
                    "to": action.get("to") or (t.get("result") or {}).get("address"),
                    "value": int(action.get("value") or "0x0", 16),
                    "input": action.get("input") or action.get("init") or "0x",
                    "error": t.get("error"),
                }
            )
        return "trace_transaction", rows


def _flatten(frame: dict[str, Any], depth: int, out: list[dict[str, Any]]) -> None:
    out.append(
        {
            "depth": depth,
            "type": frame.get("type", ""),
            "from": frame.get("from"),
            "to": frame.get("to"),
            "value": int(frame.get("value") or "0x0", 16),
            "input": frame.get("input") or "0x",
            "error": frame.get("error"),
        }
    )
    for child in frame.get("calls") or []:
        _flatten(child, depth + 1, out)
