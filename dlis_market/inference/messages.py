"""Stage input/output: a versioned, compact binary message ready to cross a network.

Wire format: one msgpack map ``{"v", "kind", "step", "sessions", "positions", "tensors"}`` where
each tensor is ``{"dtype", "shape", "data"}`` with ``data`` the raw little-endian bytes. Decoding
checks the version, the size limit, the dtype allow-list, that shapes match the byte counts and
that the batch dimension matches the session list; any violation is a :class:`MessageError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from dlis_market.inference.errors import MessageError

MESSAGE_VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a tensor dtype (``float32``, ``bfloat16``, ``float16``, ``int64``)."""
    if dtype not in _NAMES:
        raise MessageError(f"tensor dtype {dtype} cannot be sent; allowed: {', '.join(_DTYPES)}")
    return _NAMES[dtype]


def dtype_of(name: str) -> torch.dtype:
    """The tensor dtype of a wire name; raises MessageError for names outside the allow-list."""
    if name not in _DTYPES:
        raise MessageError(f"dtype {name!r} is not allowed; allowed: {', '.join(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class StageInput:
    """A batch of sessions at the same step: token ids (first stage) or hidden states ``[B, T, H]``.

    ``positions[i]`` is the absolute position of the first of the ``T`` tokens of session ``i``.
    """

    session_ids: tuple[str, ...]
    positions: tuple[int, ...]
    step: int
    token_ids: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    want_logits: bool = False

    @property
    def num_tokens(self) -> int:
        data = self.token_ids if self.token_ids is not None else self.hidden
        return 0 if data is None else int(data.shape[1])


@dataclass(frozen=True)
class StageOutput:
    """Hidden states for the next stage, or (last stage) one sampled token per session."""

    session_ids: tuple[str, ...]
    positions: tuple[int, ...]
    step: int
    hidden: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def _pack_tensor(t: torch.Tensor) -> dict[str, Any]:
    if t.dtype not in _NAMES:
        raise MessageError(f"tensor dtype {t.dtype} cannot be sent; allowed: {', '.join(_DTYPES)}")
    data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data": data}


def _unpack_tensor(name: str, raw: Any) -> torch.Tensor:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data"}:
        raise MessageError(f"tensor {name!r} must be a map with dtype, shape and data")
    dtype = _DTYPES.get(raw["dtype"])
    shape = raw["shape"]
    if dtype is None:
        raise MessageError(f"tensor {name!r} has dtype {raw['dtype']!r}; allowed: {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise MessageError(f"tensor {name!r} has a bad shape {shape!r}")
    data = raw["data"]
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not isinstance(data, bytes) or len(data) != expected:
        got = len(data) if isinstance(data, bytes) else type(data).__name__
        raise MessageError(f"tensor {name!r} shape {shape} needs {expected} bytes, got {got}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def encode(msg: StageInput | StageOutput) -> bytes:
    """Serialise a stage message."""
    kind = "in" if isinstance(msg, StageInput) else "out"
    names = ("token_ids", "hidden") if kind == "in" else ("hidden", "token_ids", "logits")
    tensors = {n: _pack_tensor(getattr(msg, n)) for n in names if getattr(msg, n) is not None}
    body: dict[str, Any] = {
        "v": MESSAGE_VERSION,
        "kind": kind,
        "step": msg.step,
        "sessions": list(msg.session_ids),
        "positions": list(msg.positions),
        "tensors": tensors,
    }
    if isinstance(msg, StageInput):
        body["want_logits"] = msg.want_logits
    blob: bytes = msgpack.packb(body, use_bin_type=True)
    if len(blob) > MAX_MESSAGE_BYTES:
        raise MessageError(
            f"message is {len(blob)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit; send fewer sessions"
        )
    return blob


def decode(blob: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> StageInput | StageOutput:
    """Parse and validate a stage message."""
    if len(blob) > max_bytes:
        raise MessageError(f"message is {len(blob)} bytes, over the {max_bytes}-byte limit")
    try:
        body = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise MessageError(f"message is not valid msgpack ({exc})") from exc
    if not isinstance(body, dict):
        raise MessageError("message must be a msgpack map")
    if body.get("v") != MESSAGE_VERSION:
        raise MessageError(f"message version {body.get('v')!r} is not supported (this build speaks {MESSAGE_VERSION})")
    kind, sessions, positions, step = (
        body.get("kind"),
        body.get("sessions"),
        body.get("positions"),
        body.get("step"),
    )
    if kind not in ("in", "out"):
        raise MessageError(f"message kind {kind!r} must be 'in' or 'out'")
    if not isinstance(sessions, list) or not all(isinstance(s, str) for s in sessions):
        raise MessageError("message sessions must be a list of strings")
    if not isinstance(positions, list) or not all(isinstance(p, int) and p >= 0 for p in positions):
        raise MessageError("message positions must be a list of non-negative ints")
    if len(positions) != len(sessions) or not isinstance(step, int):
        raise MessageError(f"message has {len(sessions)} sessions but {len(positions)} positions (or no step)")
    raw_tensors = body.get("tensors")
    if not isinstance(raw_tensors, dict):
        raise MessageError("message tensors must be a map")
    allowed = {"token_ids", "hidden"} if kind == "in" else {"hidden", "token_ids", "logits"}
    if not set(raw_tensors) <= allowed:
        raise MessageError(f"message carries unexpected tensors {sorted(set(raw_tensors) - allowed)}")
    tensors = {name: _unpack_tensor(name, raw) for name, raw in raw_tensors.items()}
    for name, t in tensors.items():
        if t.ndim == 0 or t.shape[0] != len(sessions):
            raise MessageError(f"tensor {name!r} has batch {tuple(t.shape)[:1]} but there are {len(sessions)} sessions")
    if kind == "in":
        return StageInput(
            session_ids=tuple(sessions),
            positions=tuple(positions),
            step=step,
            token_ids=tensors.get("token_ids"),
            hidden=tensors.get("hidden"),
            want_logits=bool(body.get("want_logits", False)),
        )
    return StageOutput(
        session_ids=tuple(sessions),
        positions=tuple(positions),
        step=step,
        hidden=tensors.get("hidden"),
        token_ids=tensors.get("token_ids"),
        logits=tensors.get("logits"),
    )


def split_input(msg: StageInput) -> list[StageInput]:
    """One input per session of ``msg`` (the same message when it carries one), rows as views."""
    if len(msg.session_ids) == 1:
        return [msg]
    return [
        StageInput(
            (sid,),
            (pos,),
            msg.step,
            token_ids=None if msg.token_ids is None else msg.token_ids[i : i + 1],
            hidden=None if msg.hidden is None else msg.hidden[i : i + 1],
            want_logits=msg.want_logits,
        )
        for i, (sid, pos) in enumerate(zip(msg.session_ids, msg.positions, strict=True))
    ]


def bytes_per_token(msg: StageInput | StageOutput) -> float:
    """Serialised size divided by the number of tokens it carries (sessions x positions)."""
    data = msg.token_ids if msg.token_ids is not None else msg.hidden
    tokens = 1 if data is None else max(1, int(data.shape[0]) * (int(data.shape[1]) if data.ndim > 1 else 1))
    return len(encode(msg)) / tokens
