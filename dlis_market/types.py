"""Wire types shared by every component (node, broker, oracle, chain).

Messages are frozen, strict pydantic models; ids are distinct ``NewType``s so a job id cannot
be passed where a model id is expected. A layer range is ``[start, end)``, end excluded,
everywhere: on chain, in manifests, on the wire and in logs.
"""

from __future__ import annotations

from typing import NewType

from eth_utils import keccak
from pydantic import BaseModel, ConfigDict, model_validator

# RFC 9457 problem "type" of every refusal the broker and oracle return: an identifier, never
# dereferenced, so it names no host.
PROBLEM_TYPE_BASE = "urn:dlis-market:problem:"

NodeId = NewType("NodeId", str)  # checksummed node signing address
PeerId = NewType("PeerId", str)  # libp2p peer id, base58
JobId = NewType("JobId", str)  # 0x-prefixed 32-byte hex
ZERO_ADDRESS = "0x" + "00" * 20  # "no contract / no publisher"
ModelId = NewType("ModelId", str)  # 0x-prefixed 32-byte hex: keccak256(abi.encode(publisher, keccak256(name)))
Cid = NewType("Cid", str)  # IPFS content id


class WireModel(BaseModel):
    """Base of every message between components: immutable, no extra fields, no coercion."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


class LayerRange(WireModel):
    """Transformer layers ``[start, end)`` served by one stage."""

    start: int
    end: int

    @model_validator(mode="after")
    def _check(self) -> LayerRange:
        if self.start < 0 or self.end <= self.start:
            raise ValueError(f"layer range [{self.start}, {self.end}) is empty or negative; need 0 <= start < end")
        return self

    @property
    def size(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"

    @classmethod
    def parse(cls, text: str) -> LayerRange:
        """Parse ``"a:b"`` (CLI form) into ``[a, b)``."""
        try:
            a, b = text.split(":")
            return cls(start=int(a), end=int(b))
        except ValueError as exc:
            raise ValueError(f"layer range {text!r} must look like START:END (end excluded), e.g. 0:10") from exc


def name_hash(name: str) -> bytes:
    """keccak256 of a model's name (e.g. ``"smollm2-135m"``): what ``publishModel`` takes."""
    return bytes(keccak(text=name))


def model_id(name: str, publisher: str) -> ModelId:
    """The on-chain id of the model ``publisher`` published as ``name``:
    keccak256(abi.encode(publisher, keccak256(name))), as ``NodeRegistry.modelIdOf`` computes it.
    Ids are namespaced by publisher, so nobody can take another publisher's model id."""
    address = bytes.fromhex(publisher.removeprefix("0x"))
    if len(address) != 20:
        raise ValueError(f"publisher {publisher!r} is not an address (0x + 40 hex digits)")
    return ModelId("0x" + keccak(b"\x00" * 12 + address + name_hash(name)).hex())
