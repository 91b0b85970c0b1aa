"""Read one shard file in a single streaming pass: hash it, decode it, keep only fresh tensors.

The sha256 is computed over exactly the bytes that are decoded, so nothing can change between
check and use, and the peak memory is the stage's tensors plus one tensor in flight (no whole-file
buffer, no mmap pages). Tensors are freshly allocated (aligned): tensors that view a file buffer can
be misaligned, and BLAS then takes a numerically different kernel path.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import IO, Any

import torch
import zstandard

from dlis_market.inference.errors import ShardIntegrityError
from dlis_market.inference.manifest import FileEntry, check_digest, check_size

MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _HashingReader:
    """A file wrapper that feeds every byte read into a sha256."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _read_exact(src: Any, size: int, path: Path) -> bytes:
    chunks, left = [], size
    while left > 0:
        chunk = src.read(left)
        if not chunk:
            raise ShardIntegrityError(f"{path} ends early (truncated); delete it and re-export or fetch it again")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _parse(src: Any, path: Path) -> dict[str, torch.Tensor]:
    (header_len,) = struct.unpack("<Q", _read_exact(src, 8, path))
    if header_len > MAX_HEADER_BYTES:
        raise ShardIntegrityError(f"{path} has a {header_len}-byte header (corrupt); re-export or fetch it again")
    try:
        header = json.loads(_read_exact(src, header_len, path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardIntegrityError(f"{path} has a corrupt safetensors header ({exc}); re-export it") from exc
    header.pop("__metadata__", None)
    tensors: dict[str, torch.Tensor] = {}
    position = 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None or start != position or end < start:
            raise ShardIntegrityError(f"{path}: tensor {name} has a bad dtype or offsets; re-export it")
        size = end - start
        if size != math.prod(info["shape"]) * torch.empty((), dtype=dtype).element_size():
            raise ShardIntegrityError(f"{path}: tensor {name} size does not match its shape; re-export it")
        raw = bytearray(_read_exact(src, size, path))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        tensors[name] = flat.view(dtype).reshape(info["shape"]).clone()
        position = end
    return tensors


def read_shard(root: Path, entry: FileEntry, compression: str) -> dict[str, torch.Tensor]:
    """Tensors of one shard file, after checking its size and (in the same pass) its sha256."""
    path = check_size(root, entry)
    with path.open("rb") as fh:
        reader = _HashingReader(fh)
        try:
            if compression == "zstd":
                stream = zstandard.ZstdDecompressor().stream_reader(reader, closefd=False)  # type: ignore[arg-type]
                tensors = _parse(stream, path)
            else:
                tensors = _parse(reader, path)
            reader.drain()
        except (
            ShardIntegrityError,
            zstandard.ZstdError,
            struct.error,
            KeyError,
            TypeError,
            ValueError,
            RuntimeError,
        ) as exc:
            # Report a hash mismatch first when there is one: it says more than the decode error.
            reader.drain()
            if reader.digest.hexdigest() == entry.sha256:
                raise ShardIntegrityError(f"{path} cannot be decoded ({exc}); re-export the shards") from exc
            tensors = {}
    check_digest(path, reader.digest.hexdigest(), entry)
    return tensors
