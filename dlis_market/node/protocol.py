"""Wire protocol between peers: length-prefixed msgpack frames over one libp2p stream.

A frame is a 4-byte big-endian length followed by a msgpack map
``{"v": PROTOCOL_VERSION, "op": str, "rid": int, "body": map}``. The length is checked against
the limit before any byte of the body is read, so an oversized frame costs nothing; the stream
that carried it is answered with an error and closed (it cannot be resynchronised), the others
go on. ``rid`` > 0 asks for an answer (``reply`` or ``error`` with the same rid).

Ops (bodies are the ``*Body`` models below; ``step`` carries an ``inference.messages`` blob):
``open``, ``step``, ``close``, ``info``, ``transcript`` (client -> stage; a closed session's
inputs, for spot checks: ``node/transcripts.py``), ``receipts`` (a vanished opener's kept
receipts), ``batch_receipt`` (broker -> stage: sign one Merkle ``BatchReceipt`` over receipts the
stage signed, ``node/receipts.py`` ``sign_batch``), ``fingerprint_check`` (broker -> replica:
validate another stage's call with one prefill, ``node/call_checks.py``), ``share_linear`` (client
-> a worker of its private layer: one projection of one share, ``node/shared_layers.py``),
``share_close`` (the same client: the worker's signed receipt for those projections), ``tokens`` and
``fail`` (stage -> the session's caller; a stage whose next peer is the caller itself sends
``step``), ``reply``/``error`` (answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import msgpack
from pydantic import Field, ValidationError

from dlis_market.inference.sampling import FEATURES, SamplingParams, TokenLogprob
from dlis_market.node.errors import PeerUnreachableError, ProtocolError, RemoteError
from dlis_market.types import WireModel

log = logging.getLogger(__name__)

M = TypeVar("M", bound=WireModel)

PROTOCOL_NAME = "/dlis/stage/1"
PROTOCOL_VERSION = 1
MAX_CONTROL_BYTES = 1 << 20  # frames other than step/tokens
OPS = frozenset(
    {
        "open",
        "step",
        "close",
        "info",
        "transcript",
        "receipts",
        "batch_receipt",
        "fingerprint_check",
        "share_linear",
        "share_close",
        "tokens",
        "fail",
        "reply",
        "error",
    }
)


class SamplingUnsupportedError(RemoteError):
    """A last stage cannot serve a session's sampling (a feature it does not name in its open
    answer, or values it refuses): route around it, it is no fault of the stage."""

    def __init__(self, message: str, peer: str | None = None) -> None:
        super().__init__(message, "SamplingUnsupportedError", peer)


class OpenBody(WireModel):
    """Open a session on a stage. The sampling fields matter on the last stage only. Fields after
    ``ticket`` were added later: a driver sends them only when they differ from their defaults
    (and to the last stage only), so a worker that predates them still serves plain sessions, and
    names what it supports in its :class:`OpenAnswer`."""

    session_id: str
    model: str
    start: int
    end: int
    max_length: int
    job_id: bytes  # 32 bytes
    reply_to: str  # peer id that gets the sampled tokens and failures
    next_peer: str | None  # None: this is the last stage
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    ticket: dict[str, Any] | None = None  # protocol.tickets.SignedTicket; refused when missing
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    bias_tokens: list[int] = Field(default_factory=list)  # logit_bias as two lists (msgpack map keys are strings only)
    bias_values: list[float] = Field(default_factory=list)
    logprobs: int | None = None  # top log probabilities to return with each token; None: none
    adapter: dict[str, Any] | None = None  # protocol.adapters.AdapterRef: the LoRA adapter the session applies
    proof: Literal["zk"] | None = None  # last stage: prove its head's calls (inference/zk_stage.py) at close

    @classmethod
    def build(cls, sampling: SamplingParams, last: bool, **fields: Any) -> OpenBody:
        """An open body with ``sampling``; the penalties, bias and logprobs only when ``last``."""
        s = sampling
        extra: dict[str, Any] = {}
        if last:
            extra = {
                "presence_penalty": float(s.presence_penalty), "frequency_penalty": float(s.frequency_penalty),
                "bias_tokens": [int(t) for t, _ in s.logit_bias], "bias_values": [float(b) for _, b in s.logit_bias],
                "logprobs": s.logprobs,
            }  # fmt: skip
        return cls(
            greedy=s.greedy, temperature=float(s.temperature), top_k=s.top_k, top_p=float(s.top_p), seed=s.seed,
            **extra, **fields,
        )  # fmt: skip

    def wire(self) -> dict[str, Any]:
        """The body to send: fields at their default are left out (a worker that predates a
        field refuses it by name otherwise)."""
        return self.model_dump(exclude_defaults=True)

    def sampling(self) -> SamplingParams:
        """The session's sampling; SamplingUnsupportedError for values the sampler refuses."""
        if len(self.bias_tokens) != len(self.bias_values):
            raise SamplingUnsupportedError(
                f"logit_bias has {len(self.bias_tokens)} token ids but {len(self.bias_values)} values; send one each"
            )
        try:
            return SamplingParams(
                greedy=self.greedy, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                logit_bias=tuple(zip(self.bias_tokens, self.bias_values, strict=True)), logprobs=self.logprobs,
            )  # fmt: skip
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise SamplingUnsupportedError(f"sampling {where}: {err['msg']}") from exc


class OpenAnswer(WireModel):
    """A stage's answer to ``open``: the sampling features (of ``sampling.FEATURES``) it applies.
    A worker that predates them answers ``session_id`` only, i.e. none."""

    session_id: str
    sampling: list[str] = Field(default_factory=list)

    def lacks(self, need: frozenset[str]) -> frozenset[str]:
        return need - set(self.sampling)


SUPPORTED_SAMPLING = sorted(FEATURES)  # what this code's workers answer


class StepBody(WireModel):
    input: bytes  # inference.messages.encode(StageInput)
    reply_to: str


class CloseBody(WireModel):
    session_id: str


class ReceiptsBody(WireModel):
    """Ask for the receipts a stage signed for a job's sessions whose opener vanished."""

    job_id: bytes


class BatchReceiptBody(WireModel):
    """Ask a stage to sign its ``BatchReceipt`` for a settlement batch: ``receipts`` are the wire
    receipts (``node.receipts.to_wire``) it signed in the batch, in batch order."""

    broker: str  # the broker that settles (the BatchReceipt's broker; JobMarket's msg.sender)
    batch_id: bytes  # 32 bytes
    receipts: list[dict[str, Any]]


class BatchReceiptAnswer(WireModel):
    """A stage's signed ``BatchReceipt`` (the broker rebuilds it and checks the signature)."""

    node_address: str
    root: bytes  # 32 bytes
    total: str  # uint256 as a decimal string
    count: int
    signature: bytes  # 65 bytes


class WireLogprob(WireModel):
    """A sampled token's log probability and the most likely tokens' (``sampling.TokenLogprob``)."""

    token: int
    logprob: float
    top_tokens: list[int] = Field(default_factory=list)
    top_logprobs: list[float] = Field(default_factory=list)

    @classmethod
    def of(cls, lp: TokenLogprob) -> WireLogprob:
        return cls(
            token=lp.token, logprob=float(lp.logprob), top_tokens=[int(t) for t, _ in lp.top],
            top_logprobs=[float(v) for _, v in lp.top],
        )  # fmt: skip

    def native(self) -> TokenLogprob:
        return TokenLogprob(self.token, self.logprob, tuple(zip(self.top_tokens, self.top_logprobs, strict=False)))


class TokensBody(WireModel):
    """Sampled tokens, one per session; ``logprobs`` (one per session, None for a session that did
    not ask) only when some session asked for them, so a driver that predates it never sees it."""

    sessions: list[str]
    step: int
    token_ids: list[int]
    logprobs: list[WireLogprob | None] | None = None


class FailBody(WireModel):
    sessions: list[str]
    step: int
    peer: str  # the peer that failed (the sender itself, or its unreachable next hop)
    message: str


def parse_body(model: type[M], body: Any) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise ProtocolError(f"malformed {model.__name__}: {exc.errors()[0]['msg']}") from exc


def pack_frame(op: str, body: dict[str, Any], rid: int = 0, max_bytes: int = MAX_CONTROL_BYTES) -> bytes:
    blob: bytes = msgpack.packb({"v": PROTOCOL_VERSION, "op": op, "rid": rid, "body": body}, use_bin_type=True)
    if len(blob) > max_bytes:
        raise ProtocolError(f"{op} frame is {len(blob)} bytes, over the {max_bytes}-byte limit")
    return len(blob).to_bytes(4, "big") + blob


def unpack_frame(blob: bytes) -> tuple[str, int, dict[str, Any]]:
    try:
        env = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise ProtocolError(f"frame is not valid msgpack ({exc})") from exc
    if not isinstance(env, dict):
        raise ProtocolError("frame must be a msgpack map")
    if env.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {env.get('v')!r} is not supported (this node speaks {PROTOCOL_VERSION})")
    op, rid, body = env.get("op"), env.get("rid"), env.get("body")
    if op not in OPS or not isinstance(rid, int) or rid < 0 or not isinstance(body, dict):
        raise ProtocolError(f"frame has a bad op {op!r}, rid {rid!r} or body type")
    return op, rid, body


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    """One frame body; raises ProtocolError before reading an oversized body."""
    header = await reader.readexactly(4)
    size = int.from_bytes(header, "big")
    if size > max_bytes:
        raise ProtocolError(f"frame of {size} bytes is over the {max_bytes}-byte limit")
    return await reader.readexactly(size)


Handler = Callable[["Channel", str, int, dict[str, Any]], Awaitable[None]]


class Channel:
    """One stream to a peer: sends frames, matches answers to requests, hands other ops to ``on_message``."""

    def __init__(
        self,
        peer: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_message: Handler,
        max_bytes: int,
        on_closed: Callable[[Channel], None] | None = None,
    ) -> None:
        self.peer = peer
        self._reader = reader
        self._writer = writer
        self._on_message = on_message
        self._on_closed = on_closed
        self.max_bytes = max_bytes
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._rids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.closed = False

    async def send(self, op: str, body: dict[str, Any], rid: int = 0) -> None:
        frame = pack_frame(op, body, rid, self.max_bytes)
        if self.closed:
            raise PeerUnreachableError(f"stream to {self.peer} is closed", self.peer)
        try:
            async with self._lock:
                self._writer.write(frame)
                await self._writer.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:  # peer or daemon gone
            self.close()
            raise PeerUnreachableError(f"cannot send {op} to {self.peer}: {exc}", self.peer) from exc

    async def request(self, op: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        rid = next(self._rids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.send(op, body, rid)
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError as exc:
            raise PeerUnreachableError(f"{self.peer} did not answer {op} within {timeout_s:.1f}s", self.peer) from exc
        finally:
            self._pending.pop(rid, None)

    async def run(self) -> None:
        """Read frames until the stream ends; a broken frame answers an error and ends this stream only."""
        try:
            while True:
                blob = await read_frame(self._reader, self.max_bytes)
                op, rid, body = unpack_frame(blob)
                if op in ("reply", "error") and rid in self._pending:
                    fut = self._pending[rid]
                    if not fut.done():
                        if op == "reply":
                            fut.set_result(body)
                        else:
                            fut.set_exception(
                                RemoteError(str(body.get("message", "?")), str(body.get("code", "error")), self.peer)
                            )
                    continue
                await self._on_message(self, op, rid, body)
        except ProtocolError as exc:
            log.warning("refused a frame from %s: %s", self.peer, exc)
            with contextlib.suppress(PeerUnreachableError, ProtocolError):
                await self.send("error", {"message": str(exc), "code": "protocol"})
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the stream ended: the finally below reports it
        except PeerUnreachableError:
            if not self.closed:  # about another peer (this stream still works): the handler's bug
                raise
            # this stream died while the handler answered on it (the peer went away): an end of stream
        finally:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PeerUnreachableError(f"stream to {self.peer} closed", self.peer))
        with contextlib.suppress(Exception):  # closing an already-broken transport; nothing to act on
            self._writer.close()
        if self._on_closed is not None:
            self._on_closed(self)
