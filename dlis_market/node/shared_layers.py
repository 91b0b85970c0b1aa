"""A client's first layer on secret-shared activations: linear projections on two workers.

The client keeps its prompt's embeddings from the workers that compute its first layer. It embeds
the tokens itself and runs the layer's norms, rotary embedding, attention (with its own KV cache)
and activation function; each of the layer's seven projections (q, k, v, o, gate, up, down) goes
out as two additive shares over Z/2^64 (:mod:`dlis_market.inference.secret_sharing`), one to each
of two workers that serve the layer (of different operators), over the ``share_linear`` op. Each
worker multiplies its share by its fixed-point weights; the client adds the two answers.

What each party learns, exactly:
- each share worker: one uniformly random share per projection call, independent of the
  activations (perfect secrecy, whatever its computing power), the call's shape (tokens x width)
  and timing; the two workers' operators together (if they collude) learn the activations;
- the stage that continues after the private layer: the hidden state after it, which (like any
  hidden state) can be inverted toward the prompt; the private layer keeps the *embeddings*, and
  the first layer's own activations, from the workers, not the prompt from every later stage.

Fixed point: activations with :data:`X_BITS` fraction bits, weights with :data:`W_BITS`, so the
answer is exact to about ``2**-X_BITS`` per input element times the weights, while ``|x @ W|``
stays below ``2**(62 - X_BITS - W_BITS)`` (2^26: far above any activation of a trained model).

- :class:`ShareLinearBody` / :class:`SharedProjections`: the worker's side (``node/server.py``);
- :class:`PrivateLayers`: the client's side, the entry stage's first layer with its projections
  replaced by remote ones (the stage's own code runs everything else).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import Field
from torch import nn
from transformers import DynamicCache

from dlis_market.inference.secret_sharing import FixedPoint, SharedLinear, reconstruct, share
from dlis_market.node.errors import NodeError, ProtocolError
from dlis_market.node.receipts import ReceiptLedger
from dlis_market.types import WireModel

if TYPE_CHECKING:
    from dlis_market.inference.stage import Stage  # the caller loads it (transformers stays out of a broker's start)

# projection -> the layer submodule holding it (Llama family)
PROJECTIONS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}  # fmt: skip
X_BITS = 18
W_BITS = 18
CODEC = FixedPoint(X_BITS, W_BITS)
# A call carries at most this many bytes of share in, and of answer out: the client splits rows.
SHARE_FRAME_BYTES = 512 * 1024
# A job may ask a worker for at most this many projections' rows per layer and token of its
# longest session: 7 projections, 4 times over (a step runs again after its partner failed, up to
# the driver's 3 failovers, a long prefill included), and slack.
ROWS_PER_JOB_FACTOR = 32
MAX_TRACKED_JOBS = 4096
# A job whose caller sent a share within this long counts as load (one session slot) in the span
# record the worker announces, so routers see share work; a caller that vanished stops counting.
ACTIVE_S = 30.0


class ShareCloseBody(WireModel):
    """Ends the caller's shared projections of ``job_id`` here: the answer is the worker's signed
    receipt for them (its range, the tokens its first projection took, their price)."""

    job_id: bytes


class ShareLinearBody(WireModel):
    """One share of a projection's input ``[rows, in]`` (int64 little endian, row major), for
    layer ``layer`` of the worker's range ``[start, end)`` of ``model``, under a ticket of ``job_id``."""

    model: str
    start: int = Field(ge=0, lt=2**32)
    end: int = Field(ge=1, lt=2**32)
    job_id: bytes
    ticket: dict[str, Any] | None = None
    layer: int = Field(ge=0, lt=2**32)
    projection: str
    position: int = Field(ge=0, lt=2**32)  # the session position of the first row (what is billed)
    rows: int = Field(ge=1, le=1 << 16)
    share: bytes


def _weight(stage: Stage, layer: int, projection: str) -> torch.Tensor:
    """The projection's weight, on CPU (int64 matmuls run there), of the entry stage's layers only."""
    if projection not in PROJECTIONS:
        raise ProtocolError(f"projection {projection!r} is not one of {', '.join(PROJECTIONS)}")
    if not stage.is_first or not stage.layers.start <= layer < stage.layers.end:
        raise ProtocolError(
            f"layer {layer} is not in this stage's range {stage.layers} of a model's first stage: shares are "
            "served for the layers of the stage that holds the embeddings"
        )
    block = stage.family.get_layers(stage.model)[layer - stage.layers.start]
    module = getattr(getattr(block, PROJECTIONS[projection], None), projection, None)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ProtocolError(
            f"layer {layer}'s {projection} is not a plain float linear here (quantized stages and families "
            "without Llama projections cannot serve shares)"
        )
    return weight.detach().cpu()


class SharedProjections:
    """A worker's projections in fixed point, made on first use per (layer, projection) of its
    first-stage layers. Work is bounded per (job, caller): one share frame per call and, over a
    job, the rows of :data:`ROWS_PER_JOB_FACTOR` projections of the stage's longest session."""

    def __init__(self, stage: Stage, new_ledger: Callable[[bytes, str], ReceiptLedger]) -> None:
        self.stage = stage
        self.new_ledger = new_ledger  # (job id, broker of its ticket) -> the receipt ledger of the work
        self._linears: dict[tuple[int, str], SharedLinear] = {}
        self._rows: OrderedDict[tuple[bytes, str], int] = OrderedDict()  # (job, caller) -> rows served
        # (job, caller) -> its bill, the session position the caller's first call was at, and when
        # it was last used (most recent last)
        self._ledgers: OrderedDict[tuple[bytes, str], tuple[ReceiptLedger, int, float]] = OrderedDict()
        self._lock = threading.Lock()  # apply runs in a worker thread, the announcement reads on the loop

    def apply(self, req: ShareLinearBody, caller: str, broker: str) -> dict[str, Any]:
        """One projection of one share, billed to the caller's ledger of the job: the tokens are
        the session positions the stage's first projection of its first layer reached, from the
        one of the caller's first call here (a step that runs again after a failed call is not
        billed twice; a worker that joins a session mid-way bills only what it computed)."""
        key = (req.layer, req.projection)
        if key not in self._linears:
            self._linears[key] = SharedLinear(_weight(self.stage, req.layer, req.projection), CODEC)
        linear = self._linears[key]
        width, cols = linear.w_ring_t.shape
        if len(req.share) != 8 * req.rows * width:
            raise ProtocolError(
                f"a share of {req.rows} rows of {width} int64 values is {8 * req.rows * width} bytes, "
                f"got {len(req.share)}"
            )
        if 8 * req.rows * max(width, cols) > SHARE_FRAME_BYTES:
            raise ProtocolError(
                f"{req.rows} rows of {width} -> {cols} values exceed the {SHARE_FRAME_BYTES}-byte share frame: "
                f"send at most {SHARE_FRAME_BYTES // (8 * max(width, cols))} rows a call"
            )
        tokens = self.stage.sessions.token_limit
        budget = ROWS_PER_JOB_FACTOR * self.stage.layers.size * tokens
        used = self._rows.pop((req.job_id, caller), 0) + req.rows
        self._rows[(req.job_id, caller)] = used
        while len(self._rows) > MAX_TRACKED_JOBS:
            self._rows.popitem(last=False)
        if used > budget:
            raise ProtocolError(
                f"job 0x{req.job_id.hex()[:16]}.. asked for {used} rows of shared projections here, over the "
                f"{budget} its session could need ({ROWS_PER_JOB_FACTOR} projections x layers x "
                f"{tokens} tokens)"
            )
        x = torch.from_numpy(np.frombuffer(req.share, dtype="<i8").copy()).reshape(req.rows, width)
        answer = linear.apply(x).numpy().astype("<i8").tobytes()
        job = (req.job_id, caller)
        with self._lock:
            if job in self._ledgers:
                ledger, base, _ = self._ledgers.pop(job)
            else:
                ledger, base = self.new_ledger(req.job_id, broker), req.position
            self._ledgers[job] = (ledger, base, time.monotonic())
            while len(self._ledgers) > MAX_TRACKED_JOBS:
                self._ledgers.popitem(last=False)
        first = (req.layer, req.projection) == (self.stage.layers.start, "q_proj")
        reached = req.position + req.rows - base if first else 0
        ledger.record(max(0, reached - ledger.tokens), answer)  # the hash covers every answer, in order
        return {"out": answer, "cols": int(cols)}

    def close(self, job_id: bytes, caller: str) -> ReceiptLedger:
        """The caller's ledger of the job, taken out (a second close finds none)."""
        with self._lock:
            held = self._ledgers.pop((job_id, caller), None)
        if held is None:
            raise NodeError(
                f"no shared projections of job 0x{job_id.hex()[:16]}.. from you here (never asked, closed "
                f"already, or one of the {MAX_TRACKED_JOBS} oldest forgotten)"
            )
        return held[0]

    def close_all(self, caller: str) -> list[ReceiptLedger]:
        """Every ledger of ``caller`` (gone: its stream ended), taken out, the ones that billed tokens."""
        with self._lock:
            mine = [key for key in self._ledgers if key[1] == caller]
            taken = [self._ledgers.pop(key)[0] for key in mine]
        return [ledger for ledger in taken if ledger.tokens > 0]

    def active(self, within_s: float = ACTIVE_S) -> int:
        """Jobs whose caller sent a share here within ``within_s`` and has not closed them."""
        since, count = time.monotonic() - within_s, 0
        with self._lock:
            recent = [used for _, _, used in self._ledgers.values()]
        for used in reversed(recent):
            if used < since:
                break
            count += 1
        return count


# (layer, projection, position of the first row, rows, share for worker A, share for worker B)
# -> (A's answer, B's, columns)
Call = Callable[[int, str, int, int, bytes, bytes], Coroutine[Any, Any, tuple[bytes, bytes, int]]]


class _RemoteLinear(nn.Module):
    """A projection computed by the two share workers (see :class:`PrivateLayers`); its bias, if
    any, is added here."""

    def __init__(self, owner: PrivateLayers, layer: int, projection: str, weight: torch.Tensor, bias: Any) -> None:
        super().__init__()
        weight = weight.detach()
        self.owner, self.layer, self.projection, self.dtype = owner, layer, projection, weight.dtype
        self.cols, self.width = int(weight.shape[0]), int(weight.shape[1])
        self.row_abs_sum = float(weight.float().abs().sum(dim=1).max())  # for the ring's headroom
        self.bias = bias.detach().float() if isinstance(bias, torch.Tensor) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.owner.project(self, x)
        return (out if self.bias is None else out + self.bias).to(self.dtype)


class PrivateLayers:
    """The client's side: ``entry`` (the model's first stage, loaded locally for its embeddings,
    norms and attention) with every projection of its layers computed on shares by ``call``
    (which sends the two shares to the two workers and returns their answers). All of the entry
    stage's layers are computed this way: publish the model with a first stage of one layer to
    keep the client's share of the work to one layer.

    :meth:`forward` runs in a worker thread (torch calls the projections synchronously); the
    shares go out through ``loop``, the event loop the P2P connections live on. Workers are
    trusted to compute, not to see: a worker that adds an error to its answer is not detected."""

    def __init__(self, entry: Stage, call: Call, loop: asyncio.AbstractEventLoop, timeout_s: float = 60.0):
        if not entry.is_first:
            raise ProtocolError("the private layers start at the embeddings: load the model's first stage")
        if entry.device.type != "cpu":
            raise ProtocolError(f"the client's private layers run on CPU (fixed point in int64), not {entry.device}")
        self.entry, self.call, self.loop, self.timeout_s = entry, call, loop, timeout_s
        self.cache = DynamicCache()
        self.position = 0
        self.bytes_sent = 0  # share bytes to both workers
        self.calls = 0
        blocks = entry.family.get_layers(entry.model)
        for i, block in enumerate(blocks):
            for projection, parent in PROJECTIONS.items():
                holder = getattr(block, parent, None)
                original = getattr(holder, projection, None)
                weight = getattr(original, "weight", None)
                if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
                    raise ProtocolError(
                        f"layer {entry.layers.start + i}'s {projection} is not a plain float linear: the private "
                        "layers need an unquantized Llama-family first stage"
                    )
                bias = getattr(original, "bias", None)
                setattr(holder, projection, _RemoteLinear(self, entry.layers.start + i, projection, weight, bias))

    def project(self, linear: _RemoteLinear, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` of the layer's projection, computed on shares by the two workers (rows go
        in frames of at most :data:`SHARE_FRAME_BYTES`, in and out: a long prompt's prefill too)."""
        rows = x.reshape(-1, x.shape[-1]).float()
        if not bool(torch.isfinite(rows).all()):
            raise ProtocolError(f"layer {linear.layer}'s {linear.projection} input is not finite")
        CODEC.check_headroom(rows, linear.row_abs_sum)
        per_frame = max(1, SHARE_FRAME_BYTES // (8 * max(linear.width, linear.cols)))
        outs = [
            self._project_rows(linear, self.position + i * per_frame, chunk)
            for i, chunk in enumerate(rows.split(per_frame))
        ]
        return torch.cat(outs).reshape(*x.shape[:-1], linear.cols)

    def _project_rows(self, linear: _RemoteLinear, position: int, rows: torch.Tensor) -> torch.Tensor:
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:  # no loop in this thread: the worker thread forward() runs in
            on_loop = False
        if on_loop:
            raise ProtocolError("PrivateLayers.forward blocks: run it in a worker thread (asyncio.to_thread)")
        a, b = share(CODEC.encode_x(rows))
        shares = (a.numpy().astype("<i8").tobytes(), b.numpy().astype("<i8").tobytes())
        future = asyncio.run_coroutine_threadsafe(
            self.call(linear.layer, linear.projection, position, rows.shape[0], *shares), self.loop
        )
        try:
            out_a, out_b, cols = future.result(self.timeout_s)
        except BaseException:
            future.cancel()
            raise
        n = rows.shape[0] * linear.cols
        if cols != linear.cols or len(out_a) != 8 * n or len(out_b) != 8 * n:
            raise ProtocolError(
                f"layer {linear.layer}'s {linear.projection}: the workers answered {len(out_a)} and {len(out_b)} "
                f"bytes of {cols} columns, expected {8 * n} bytes of {linear.cols}"
            )
        self.bytes_sent += 2 * len(shares[0])
        self.calls += 1
        ya = torch.from_numpy(np.frombuffer(out_a, dtype="<i8").copy()).reshape(rows.shape[0], cols)
        yb = torch.from_numpy(np.frombuffer(out_b, dtype="<i8").copy()).reshape(rows.shape[0], cols)
        return CODEC.decode(reconstruct(ya, yb))

    @torch.no_grad()
    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[1, T]`` at the session's next positions -> the hidden state after the
        shared layers ``[1, T, H]`` (what the next stage takes). A failed call leaves the
        session as it was: the KV cache is cut back to the positions before it."""
        n = token_ids.shape[1]
        if n == 0:
            raise ProtocolError("a step of the private layers needs at least one token")
        position_ids = torch.arange(self.position, self.position + n).unsqueeze(0)
        e = self.entry
        try:
            hidden = e.family.embed(e.model, token_ids, position_ids)
            hidden = e.family.run_layers(e.model, hidden, position_ids, self.cache, e.stage_config)
        except BaseException:
            # this step's keys and values, layer by layer: a call that failed mid-step leaves the
            # layers before it one step longer than those after it
            for layer in self.cache.layers:  # Llama layers: DynamicLayer (keys, values)
                cached: Any = layer
                extra = cached.get_seq_length() - self.position
                if extra > 0:
                    cached.crop(-extra)
            raise
        self.position += n
        return hidden
