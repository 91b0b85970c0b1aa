"""The IPLD pieces a trustless gateway and its client need: CIDs, dag-pb/UnixFS nodes, CARv1.

Only what Kubo's defaults produce and what dlis serves is read: CIDv0 (base58btc, dag-pb,
sha2-256) and CIDv1 (base32 ``b...`` or base58btc ``z...``; dag-pb or raw; sha2-256 or identity).
Every function here is pure (no I/O); the gateway server (:mod:`.gateway`) and its client
(:mod:`.gateway_client`) do the reading and writing.

- CIDs: https://github.com/multiformats/cid; multihash: https://multiformats.io/multihash/
- dag-pb (``PBNode {Links = 2; Data = 1}``, ``PBLink {Hash = 1; Name = 2; Tsize = 3}``):
  https://ipld.io/specs/codecs/dag-pb/spec/; UnixFS ``Data {Type = 1; Data = 2; filesize = 3;
  blocksizes = 4}``: https://specs.ipfs.tech/unixfs/
- CARv1 (``varint(len) header`` then ``varint(len) CID block`` sections):
  https://ipld.io/specs/transport/car/carv1/
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

DAG_PB = 0x70
RAW = 0x55
SHA2_256 = 0x12
IDENTITY = 0x00
UNIXFS_RAW, UNIXFS_FILE = 0, 2
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
# The largest block a client takes (Kubo's bitswap limit is 2 MiB; its chunks are 256 KiB).
MAX_BLOCK = 2 << 20


class IpldError(ValueError):
    """Bytes that are not a valid CID, multihash, dag-pb node or CAR section."""


# ------------------------------------------------------------------ varints and bases


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | memoryview, at: int = 0) -> tuple[int, int]:
    """(value, offset after it) of the unsigned LEB128 varint at ``data[at:]``."""
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise IpldError("truncated or oversized varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def b58decode(text: str) -> bytes:
    n = 0
    for char in text:
        if char not in _B58_INDEX:
            raise IpldError(f"{char!r} is not a base58btc digit")
        n = n * 58 + _B58_INDEX[char]
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58[rem])
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + "".join(reversed(out))


def _b32decode(text: str) -> bytes:
    try:
        return base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except ValueError as exc:
        raise IpldError(f"invalid base32: {exc}") from None


def _b32encode(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


# ------------------------------------------------------------------ CIDs


@dataclass(frozen=True)
class Cid:
    """A parsed CID: ``version`` 0 or 1, content ``codec``, and its ``multihash`` bytes."""

    version: int
    codec: int
    multihash: bytes

    @classmethod
    def parse(cls, text: str) -> Cid:
        """From its string form: ``Qm...`` (v0), ``b...`` (v1 base32) or ``z...`` (v1 base58btc)."""
        if len(text) == 46 and text.startswith("Qm"):
            return cls.from_bytes(b58decode(text))
        if text[:1] in ("b", "B"):
            return cls.from_bytes(_b32decode(text[1:]))
        if text[:1] == "z":
            return cls.from_bytes(b58decode(text[1:]))
        raise IpldError(f"{text!r} is not a CID (expected Qm... or a base32 b... / base58 z... CIDv1)")

    @classmethod
    def from_bytes(cls, data: bytes) -> Cid:
        cid, end = cls.read(data)
        if end != len(data):
            raise IpldError(f"{len(data) - end} bytes after the CID")
        return cid

    @classmethod
    def read(cls, data: bytes | memoryview, at: int = 0) -> tuple[Cid, int]:
        """The binary CID at ``data[at:]`` and the offset after it (CARs and dag-pb links)."""
        if data[at : at + 2] == b"\x12\x20":  # a bare sha2-256 multihash: CIDv0
            end = at + 34
            if end > len(data):
                raise IpldError("truncated CIDv0")
            return cls(0, DAG_PB, bytes(data[at:end])), end
        version, pos = decode_varint(data, at)
        if version != 1:
            raise IpldError(f"CID version {version} is not supported")
        codec, pos = decode_varint(data, pos)
        start = pos
        _, pos = decode_varint(data, pos)  # hash function
        length, pos = decode_varint(data, pos)
        if pos + length > len(data):
            raise IpldError("truncated multihash")
        return cls(1, codec, bytes(data[start : pos + length])), pos + length

    def to_bytes(self) -> bytes:
        if self.version == 0:
            return self.multihash
        return encode_varint(1) + encode_varint(self.codec) + self.multihash

    def __str__(self) -> str:
        if self.version == 0:
            return b58encode(self.multihash)
        return "b" + _b32encode(self.to_bytes())

    @property
    def hash_code(self) -> int:
        return decode_varint(self.multihash)[0]

    @property
    def digest(self) -> bytes:
        _, pos = decode_varint(self.multihash)
        length, pos = decode_varint(self.multihash, pos)
        return self.multihash[pos : pos + length]

    @property
    def is_identity(self) -> bool:
        return self.hash_code == IDENTITY

    def matches(self, block: bytes | memoryview) -> bool:
        """True when ``block`` hashes to this CID's multihash; only sha2-256 and identity are known
        (any other hash function is refused by :func:`check_block`, never trusted)."""
        code = self.hash_code
        if code == SHA2_256:
            return hashlib.sha256(block).digest() == self.digest
        if code == IDENTITY:
            return bytes(block) == self.digest
        return False


def check_block(cid: Cid, block: bytes | memoryview) -> None:
    """Raise :class:`IpldError` unless ``block`` is the block ``cid`` names."""
    if cid.hash_code not in (SHA2_256, IDENTITY):
        raise IpldError(f"{cid}: hash function 0x{cid.hash_code:x} is not supported (sha2-256 only)")
    if not cid.matches(block):
        raise IpldError(f"block {cid} does not hash to its CID ({len(block)} bytes)")


# ------------------------------------------------------------------ dag-pb and UnixFS


def _fields(data: bytes | memoryview) -> list[tuple[int, int | memoryview]]:
    """(field number, value) of a protobuf message: varints as int, length-delimited as a view."""
    view = memoryview(data)
    out: list[tuple[int, int | memoryview]] = []
    at = 0
    while at < len(view):
        key, at = decode_varint(view, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = decode_varint(view, at)
            out.append((number, value))
        elif wire == 2:
            length, at = decode_varint(view, at)
            if at + length > len(view):
                raise IpldError("truncated protobuf field")
            out.append((number, view[at : at + length]))
            at += length
        else:
            raise IpldError(f"protobuf wire type {wire} is not used by dag-pb or UnixFS")
    return out


@dataclass(frozen=True)
class FileNode:
    """One node of a UnixFS file DAG: its own bytes of the file, then its children's, in order."""

    data: memoryview
    links: tuple[Cid, ...]


def decode_file_node(cid: Cid, block: bytes | memoryview) -> FileNode:
    """The file bytes and child CIDs of a block of a UnixFS file (dag-pb File/Raw node, or a
    ``raw`` block). Directories, symlinks and HAMT shards are refused: dlis parts are files."""
    if cid.codec == RAW:
        return FileNode(memoryview(block), ())
    if cid.codec != DAG_PB:
        raise IpldError(f"{cid}: codec 0x{cid.codec:x} is not a file block (dag-pb or raw)")
    links: list[Cid] = []
    unixfs: memoryview | None = None
    for number, value in _fields(block):
        if number == 2 and isinstance(value, memoryview):
            link_hash = next((v for n, v in _fields(value) if n == 1 and isinstance(v, memoryview)), None)
            if link_hash is None:
                raise IpldError(f"{cid}: a link without a hash")
            links.append(Cid.from_bytes(bytes(link_hash)))
        elif number == 1 and isinstance(value, memoryview):
            unixfs = value
    if unixfs is None:
        raise IpldError(f"{cid}: dag-pb node without UnixFS data")
    kind, data = UNIXFS_RAW, memoryview(b"")
    for number, value in _fields(unixfs):
        if number == 1 and isinstance(value, int):
            kind = value
        elif number == 2 and isinstance(value, memoryview):
            data = value
    if kind not in (UNIXFS_FILE, UNIXFS_RAW):
        raise IpldError(f"{cid}: UnixFS type {kind} is not a file")
    return FileNode(data, tuple(links))


def node_links(cid: Cid, block: bytes | memoryview) -> tuple[Cid, ...]:
    """Child CIDs of any dag-pb block (no UnixFS check: the server walks what it holds)."""
    if cid.codec != DAG_PB:
        return ()
    out = []
    for number, value in _fields(block):
        if number == 2 and isinstance(value, memoryview):
            link_hash = next((v for n, v in _fields(value) if n == 1 and isinstance(v, memoryview)), None)
            if link_hash is not None:
                out.append(Cid.from_bytes(bytes(link_hash)))
    return tuple(out)


# ------------------------------------------------------------------ CARv1


def car_header(root: Cid) -> bytes:
    """``varint(len)`` + the DAG-CBOR header ``{"roots": [root], "version": 1}`` (canonical key order)."""
    link = b"\0" + root.to_bytes()  # DAG-CBOR CID: tag 42 over the identity-multibase binary CID
    if len(link) < 24:
        size = bytes([0x40 + len(link)])
    elif len(link) < 256:
        size = bytes([0x58, len(link)])
    else:
        size = bytes([0x59]) + len(link).to_bytes(2, "big")
    body = b"\xa2" + b"\x65roots" + b"\x81" + b"\xd8\x2a" + size + link + b"\x67version" + b"\x01"
    return encode_varint(len(body)) + body


def car_section(cid: Cid, block: bytes) -> bytes:
    raw = cid.to_bytes()
    return encode_varint(len(raw) + len(block)) + raw + block


def check_car_header(header: bytes) -> None:
    """Refuse a CAR header that is not a DAG-CBOR map with ``version: 1`` (roots are ignored, as
    the trustless gateway spec tells clients)."""
    if not header or header[0] != 0xA2 or b"\x67version\x01" not in header:
        raise IpldError("not a CARv1 header (a DAG-CBOR map with version 1)")
