"""Read-only contract calls sent as one JSON-RPC batch, for hot paths (broker admission).

web3.py costs milliseconds of Python per call in its middleware; a batch of ``eth_call``\\ s whose
inputs and outputs are all static 32-byte words needs none of it. :class:`StaticCalls` encodes
and decodes such calls from a contract's ABI (refusing at start any function that is not all
static words); :class:`BatchPoster` posts a batch over one kept-alive HTTP connection (a tenth of
the time web3's provider takes), or through the provider for other endpoints.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from eth_utils import function_abi_to_4byte_selector
from web3 import Web3
from web3.contract import Contract

from dlis_market.chain.errors import ChainUnavailableError
from dlis_market.errors import ChainError

Request = tuple[str, Any]  # (JSON-RPC method, params)


class StaticCalls:
    """``eth_call`` requests of ``contract``'s functions ``names`` and their decoded answers."""

    def __init__(self, contract: Contract, names: Sequence[str]):
        self.address = contract.address
        abi: dict[str, dict[str, Any]] = {
            str(e["name"]): dict(e)  # type: ignore[typeddict-item]
            for e in contract.abi
            if e.get("type") == "function"
        }
        self._fns: dict[str, tuple[bytes, int]] = {}
        for name in names:
            entry = abi[name]
            inputs, outputs = [i["type"] for i in entry["inputs"]], [o["type"] for o in entry["outputs"]]
            if any(t != "address" and not t.startswith("uint") for t in inputs) or any(
                t != "bool" and not t.startswith("uint") for t in outputs
            ):
                raise ChainError(f"{name}({inputs}) -> {outputs} is not all static words; read it through web3")
            self._fns[name] = (function_abi_to_4byte_selector(entry), len(outputs))  # type: ignore[arg-type]

    def request(self, fn: str, *args: int | str) -> Request:
        """The ``eth_call`` of ``fn(*args)`` at "latest": addresses (0x-hex) and ints as 32-byte words."""
        selector = self._fns[fn][0]
        words = [_address_word(a) if isinstance(a, str) else int(a).to_bytes(32, "big") for a in args]
        data = "0x" + (selector + b"".join(words)).hex()
        return ("eth_call", [{"to": self.address, "data": data}, "latest"])

    def decode(self, fn: str, answer: Any) -> tuple[int, ...]:
        """``fn``'s answer (0x-hex) as its output words, each an int (bools 0/1)."""
        count = self._fns[fn][1]
        raw = bytes.fromhex(str(answer)[2:])
        if len(raw) != 32 * count:
            raise ChainError(f"{fn} answered {len(raw)} bytes, not {32 * count}: is {self.address} the contract?")
        return tuple(int.from_bytes(raw[i : i + 32], "big") for i in range(0, len(raw), 32))


def _address_word(address: str) -> bytes:
    """A 0x-hex address as an ABI word (no checksum work: this is a hot path)."""
    if len(address) != 42 or address[:2] not in ("0x", "0X"):
        raise ChainError(f"{address!r} is not an address (0x + 40 hex digits)")
    return bytes.fromhex(address[2:]).rjust(32, b"\0")


class BatchPoster:
    """Posts JSON-RPC batches (blocking: call it from a worker thread, one batch at a time)."""

    def __init__(self, w3: Web3, timeout_s: float):
        self.provider = w3.provider
        url = urlsplit(str(getattr(self.provider, "endpoint_uri", "") or ""))
        plain = url.scheme in ("http", "https") and url.username is None and not url.query
        self._url = url if plain else None
        self._path = url.path or "/"
        self._timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def post(self, requests: list[Request]) -> list[Any]:
        """Each request's result, or the ChainError that request gets; ChainUnavailableError when
        the endpoint gave no usable answer to the batch."""
        body = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(requests)]
        try:
            response = self._post_raw(body) if self._url is not None else self.provider.make_batch_request(requests)  # type: ignore[attr-defined]
        except (OSError, http.client.HTTPException, ValueError) as exc:  # all mean "no usable answer"
            self._conn = None
            raise ChainUnavailableError(
                f"the chain did not answer a batch of {len(requests)} reads ({type(exc).__name__}: {exc}); "
                "check the RPC endpoint"
            ) from exc
        if not isinstance(response, list) or len(response) != len(requests):  # refused the whole batch
            raise ChainError(f"the chain refused a batch of {len(requests)} reads: {response}")
        answers = sorted(response, key=lambda r: int(r["id"]))
        return [
            ChainError(f"{method} failed on chain: {a['error']}") if "error" in a else a["result"]
            for (method, _), a in zip(requests, answers, strict=True)
        ]

    def _post_raw(self, body: list[dict[str, Any]]) -> Any:
        assert self._url is not None
        for attempt in (1, 2):  # a kept-alive connection the server closed is opened again, once
            if self._conn is None:
                kind = http.client.HTTPSConnection if self._url.scheme == "https" else http.client.HTTPConnection
                self._conn = kind(self._url.hostname or "127.0.0.1", self._url.port, timeout=self._timeout_s)
            try:
                self._conn.request("POST", self._path, json.dumps(body), {"Content-Type": "application/json"})
                res = self._conn.getresponse()
                data = res.read()
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
                continue
            if res.status != 200:
                raise ValueError(f"HTTP {res.status} from the RPC endpoint: {data[:200]!r}")
            return json.loads(data)
        raise AssertionError("unreachable")
