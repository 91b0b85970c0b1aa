"""ABI-driven decoding of the market contracts' calldata, logs and custom errors.

Everything comes from the deployment manifest (each contract's address and ABI), so a new event
or function in a contract is decoded as soon as it is deployed. Values are made JSON- and
template-friendly: bytes become 0x hex, addresses are checksummed, structs become dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eth_abi import decode as abi_decode
from eth_utils import keccak, to_checksum_address

from dlis_market.chain.client import abi_type
from dlis_market.chain.deployment import Deployment


def signature(item: dict[str, Any]) -> str:
    return f"{item['name']}({','.join(abi_type(i) for i in item.get('inputs', []))})"


def _hex(raw: bytes) -> str:
    return "0x" + raw.hex()


def to_bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    return bytes.fromhex(value[2:] if value.startswith("0x") else value)


def normalize(inp: dict[str, Any], value: Any) -> Any:
    """Make a decoded ABI value printable: hex bytes, checksummed addresses, named struct fields."""
    t = str(inp["type"])
    if t.endswith("]"):
        elem = {**inp, "type": t[: t.rindex("[")]}
        return [normalize(elem, v) for v in value]
    if t == "tuple":
        return {
            c.get("name") or f"field{k}": normalize(c, v)
            for k, (c, v) in enumerate(zip(inp["components"], value, strict=True))
        }
    if t == "address":
        return to_checksum_address(value)
    if isinstance(value, bytes):
        return _hex(value)
    return value


@dataclass(frozen=True)
class DecodedCall:
    contract: str
    function: str
    signature: str
    args: dict[str, Any]


@dataclass(frozen=True)
class DecodedEvent:
    contract: str  # the ABI that matched; equal to the emitter's name for market contracts
    event: str
    signature: str
    args: dict[str, Any]
    address: str
    log_index: int | None = None
    tx_hash: str | None = None
    block: int | None = None


@dataclass(frozen=True)
class DecodedError:
    contract: str
    error: str
    args: dict[str, Any]


@dataclass
class _Abi:
    contract: str
    item: dict[str, Any]
    signature: str
    types: list[str] = field(default_factory=list)


class MarketDecoder:
    """Decoder for every contract of one deployment (plus the standard ``Error(string)``)."""

    def __init__(self, deployment: Deployment):
        self.names: dict[str, str] = {}  # lowercase address -> contract name
        self.functions: dict[tuple[str, bytes], _Abi] = {}  # (contract, selector)
        self.events: dict[tuple[str, bytes], _Abi] = {}  # (contract, topic0)
        self.any_event: dict[bytes, _Abi] = {}  # topic0 -> first ABI defining it
        self.errors: dict[bytes, _Abi] = {}
        for name, info in deployment.contracts.items():
            self.names[info.address.lower()] = name
            for item in info.abi:
                kind = item.get("type")
                if kind not in ("function", "event", "error"):
                    continue
                sig = signature(item)
                entry = _Abi(name, item, sig, [abi_type(i) for i in item.get("inputs", [])])
                digest = keccak(text=sig)
                if kind == "function":
                    self.functions[(name, digest[:4])] = entry
                elif kind == "event":
                    self.events[(name, digest)] = entry
                    self.any_event.setdefault(digest, entry)
                else:
                    self.errors.setdefault(digest[:4], entry)

    def contract_name(self, address: str | None) -> str | None:
        return self.names.get(address.lower()) if address else None

    def decode_call(self, to: str | None, data: str | bytes | None) -> DecodedCall | None:
        """Function name and arguments of a call to a market contract; None for anything else."""
        name = self.contract_name(to)
        raw = to_bytes(data)
        if name is None or len(raw) < 4:
            return None
        entry = self.functions.get((name, raw[:4]))
        if entry is None:
            return None
        return DecodedCall(name, entry.item["name"], entry.signature, _decode_args(entry, raw[4:]))

    def decode_log(self, log: dict[str, Any]) -> DecodedEvent | None:
        """Decode one log (JSON-RPC shape: address, topics, data). Market contracts' logs are
        matched against their own ABI (StakingManager and JobMarket both have ``Claimed``);
        a log of another address is decoded by the first ABI with that topic (e.g. ERC-20)."""
        topics = [to_bytes(t) for t in log.get("topics") or []]
        if not topics:
            return None
        name = self.contract_name(log.get("address"))
        entry = self.events.get((name, topics[0])) if name else None
        entry = entry or self.any_event.get(topics[0])
        if entry is None:
            return None
        inputs = entry.item.get("inputs", [])
        indexed = [i for i in inputs if i.get("indexed")]
        plain = [i for i in inputs if not i.get("indexed")]
        if len(indexed) != len(topics) - 1:
            return None  # same signature, different indexing (an ABI we do not know)
        data_values = abi_decode([abi_type(i) for i in plain], to_bytes(log.get("data")))
        by_name: dict[str, Any] = {}
        for i, topic in zip(indexed, topics[1:], strict=True):
            t = abi_type(i)
            dynamic = t in ("string", "bytes") or t.endswith("]") or t.startswith("(")
            # an indexed dynamic value is stored as its hash: show the hash
            by_name[i["name"]] = _hex(topic) if dynamic else normalize(i, abi_decode([t], topic)[0])
        for i, v in zip(plain, data_values, strict=True):
            by_name[i["name"]] = normalize(i, v)
        args = {i.get("name") or f"arg{k}": by_name.get(i.get("name")) for k, i in enumerate(inputs)}
        block = log.get("blockNumber")
        return DecodedEvent(
            contract=entry.contract,
            event=entry.item["name"],
            signature=entry.signature,
            args=args,
            address=to_checksum_address(log["address"]),
            log_index=_int(log.get("logIndex")),
            tx_hash=_hexstr(log.get("transactionHash")),
            block=_int(block),
        )

    def decode_error(self, data: str | bytes | None) -> DecodedError | None:
        """A revert's custom error (``ContractNameReason(args)``) or ``Error(string)``."""
        raw = to_bytes(data)
        if len(raw) < 4:
            return None
        if raw[:4] == keccak(text="Error(string)")[:4]:
            return DecodedError("", "Error", {"message": abi_decode(["string"], raw[4:])[0]})
        if raw[:4] == keccak(text="Panic(uint256)")[:4]:
            return DecodedError("", "Panic", {"code": abi_decode(["uint256"], raw[4:])[0]})
        entry = self.errors.get(raw[:4])
        if entry is None:
            return None
        return DecodedError(entry.contract, entry.item["name"], _decode_args(entry, raw[4:]))


def _decode_args(entry: _Abi, data: bytes) -> dict[str, Any]:
    """A call's or custom error's arguments by name (``argN`` for unnamed ones)."""
    inputs = entry.item.get("inputs", [])
    values = abi_decode(entry.types, data)
    return {i.get("name") or f"arg{k}": normalize(i, v) for k, (i, v) in enumerate(zip(inputs, values, strict=True))}


def _int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        return int(value, 16)
    return int(value)


def _hexstr(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return _hex(value)
    return str(value) if str(value).startswith("0x") else "0x" + str(value)
