"""Per-session KV caches of one stage, their limits, eviction, and batching across sessions.

Each session owns a ``DynamicCache`` built from the stage config (so Gemma3 sliding layers get
sliding cache layers). Sessions run in one forward pass by stacking their caches along the batch
dimension and splitting them back afterwards. Sessions at different positions (continuous
batching) are stacked left-padded to the longest cache: row ``i`` holds its ``n_i`` real slots
at the end, :func:`padding_mask` marks the padding, stage models attend with
:data:`RAGGED_SDPA` (each padded row over its own slots, exactly as alone), and
:func:`split_cache` gives each session back its own slots only. That needs caches whose every
layer is a plain full-attention
``DynamicLayer`` (:func:`can_pad`); sliding-window layers (Gemma3) keep only their last window
and count tokens in ``cumulative_length``, so sessions at different positions cannot share one
padded tensor there and run as separate passes.

A pass over several sessions leaves their rows in its batched cache (:meth:`SessionStore.batch_cache`,
:meth:`SessionStore.keep_batch`): while the same sessions keep running together, as merged groups
do step after step, the next pass continues that cache instead of stacking the sessions' caches
again and splitting them after (two copies of every cached token per pass: 4.9 of 37 ms of an
8-row decode pass over 10 SmolLM2 layers). Each row goes back to its session's own cache when
the session runs with others, alone, or one of them closes. Groups of sessions that travel the
pipeline apart (and take turns at a stage) keep a batch each.

Cache tensors live on the stage's device: a layer allocates them from its first keys and values
(computed there), stacking pads with zeros next to the source rows, and :func:`padding_mask` is
built on the device it is asked for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PretrainedConfig
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from dlis_market.inference.errors import ContextLengthError, SessionError
from dlis_market.inference.sampling import SamplingParams


@dataclass
class Session:
    """One generation stream as seen by one stage."""

    session_id: str
    max_length: int
    cache: DynamicCache
    sampling: SamplingParams
    generator: torch.Generator
    length: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class KeptBatch:
    """The batched cache of a pass over several sessions, whose rows stay there while the same
    sessions run together: row ``i`` is ``sessions[i]``, holding ``lengths[i]`` tokens at the end
    of the row (left-padded to the longest). Those sessions' own caches are empty meanwhile."""

    sessions: tuple[Session, ...]
    cache: DynamicCache
    lengths: list[int]

    def holds(self, session: Session) -> bool:
        return any(s is session for s in self.sessions)


class SessionStore:
    """Open sessions of a stage, bounded in count and length."""

    def __init__(self, config: PretrainedConfig, max_sessions: int, max_session_tokens: int) -> None:
        self._config = config
        self.max_sessions = max_sessions
        self.max_session_tokens = max_session_tokens
        self._sessions: dict[str, Session] = {}
        # one per group of sessions that runs together (groups that travel the pipeline apart each
        # keep theirs); a session is in one at most
        self._kept: list[KeptBatch] = []

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def token_limit(self) -> int:
        """Most tokens one session (or one checked call) may span: the model's context and
        ``inference.max_session_tokens``."""
        return min(
            self.max_session_tokens, int(getattr(self._config, "max_position_embeddings", self.max_session_tokens))
        )

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def open(self, session_id: str, max_length: int, sampling: SamplingParams | None = None) -> Session:
        if session_id in self._sessions:
            raise SessionError(f"session {session_id!r} is already open; close it first or use a new id")
        if len(self._sessions) >= self.max_sessions:
            raise SessionError(
                f"stage already holds {len(self._sessions)} sessions (limit {self.max_sessions}); close or "
                "evict idle ones, or raise inference.max_sessions"
            )
        limit = self.token_limit
        if not 0 < max_length <= limit:
            raise ContextLengthError(
                f"session {session_id!r} asks for {max_length} tokens; this stage allows 1..{limit} "
                "(model context and inference.max_session_tokens); shorten the prompt or max_new_tokens"
            )
        params = sampling or SamplingParams()
        session = Session(session_id, max_length, DynamicCache(config=self._config), params, params.generator())
        self._sessions[session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionError(
                f"session {session_id!r} is not open on this stage (closed, evicted or never opened); "
                "open it again and replay its tokens"
            ) from None

    def close(self, session_id: str) -> bool:
        """Drop a session and its cache; False if it was not open."""
        session = self._sessions.pop(session_id, None)
        if session is not None:
            for batch in [b for b in self._kept if b.holds(session)]:
                self._unbatch(batch)  # the other rows back to their sessions; this one's goes with the batch
        return session is not None

    def evict_idle(self, max_idle_s: float, now: float | None = None) -> list[str]:
        """Close every session unused for more than ``max_idle_s`` seconds; returns their ids."""
        now = time.monotonic() if now is None else now
        stale = [sid for sid, s in self._sessions.items() if now - s.last_used > max_idle_s]
        for sid in stale:
            self.close(sid)
        return stale

    def cache_bytes(self) -> int:
        caches = [s.cache for s in self._sessions.values()] + [b.cache for b in self._kept]
        total = 0
        for cache in caches:
            layers: list[Any] = list(cache.layers)
            for layer in layers:
                if layer.is_initialized and layer.keys is not None and layer.values is not None:
                    total += layer.keys.nbytes + layer.values.nbytes
        return total

    def batch_cache(self, sessions: list[Session]) -> tuple[DynamicCache, list[int], list[int]]:
        """The cache a pass over ``sessions`` continues: ``(cache, lengths, order)``, where row ``i``
        of ``cache`` is ``sessions[order[i]]``, holding ``lengths[i]`` tokens.

        The sessions of a kept batch, in any order, continue its cache as it is (``order`` puts
        their rows in the batch's order; the batch is taken out until :meth:`keep_batch` puts it
        back after the pass). Otherwise the kept batches that hold any of them give their rows back
        to their sessions first; then one session continues its own cache and several are stacked."""
        wanted = {id(s) for s in sessions}
        for batch in self._kept:
            if len(batch.sessions) == len(sessions) and {id(s) for s in batch.sessions} == wanted:
                self._kept.remove(batch)
                index = {id(s): i for i, s in enumerate(sessions)}
                return batch.cache, list(batch.lengths), [index[id(s)] for s in batch.sessions]
        for batch in [b for b in self._kept if any(id(s) in wanted for s in b.sessions)]:
            self._unbatch(batch)
        caches = [s.cache for s in sessions]
        lengths = [cache_length(c) for c in caches]
        cache = caches[0] if len(caches) == 1 else stack_caches(caches, self._config)
        return cache, lengths, list(range(len(sessions)))

    def keep_batch(self, sessions: list[Session], cache: DynamicCache, lengths: list[int]) -> None:
        """After a pass over several ``sessions`` (in ``cache``'s row order, ``lengths`` tokens each
        now): their rows stay in ``cache`` for their next pass together; their own caches are
        emptied, so that no token is held twice."""
        if len(sessions) < 2:
            raise ValueError("a kept batch holds two sessions or more; one session continues its own cache")
        for session in sessions:
            session.cache = DynamicCache(config=self._config)
        self._kept.append(KeptBatch(tuple(sessions), cache, list(lengths)))

    def unbatch(self) -> None:
        """Give every kept batch's rows back to their sessions' own caches and drop the batches."""
        for batch in list(self._kept):
            self._unbatch(batch)

    def _unbatch(self, batch: KeptBatch) -> None:
        """Each row of ``batch`` back to its session's own cache (without the padding); the batch goes."""
        self._kept.remove(batch)
        padded = len(set(batch.lengths)) > 1
        split_cache(batch.cache, [s.cache for s in batch.sessions], batch.lengths if padded else None)


# The attention implementation of every stage model. A session's result must not depend on who else
# is served, bit for bit where the kernels allow it (failover replays and spot checks compare it):
#
# - half-precision decode on the CPU (one new token per row, the steady state of continuous
#   batching): every row of the pass, padded or not, alone or not, in one float64 computation
#   (:func:`decode_attention`). Scores, softmax and the weighted sum run in float64 and are rounded
#   once, to bf16 or fp16; the other rows and the padding change only the float64 summation order,
#   an error ~1e-16 that the final rounding absorbs (measured: 0 of 0.7 M bf16 outputs of rows with
#   1-300 cached tokens differ from the row alone). One call for the pass: SmolLM2's attention shape,
#   8 rows at different positions, 0.11 ms per layer where 8 SDPA calls, row by row, took 0.41 ms;
#   a lone row of 300 tokens 0.11 ms against SDPA's 0.21 (2 threads);
# - anything else (prefill, chunked prefill, fp32, other devices): transformers' SDPA attention, and on a
#   left-padded batch each row over its own slots in its own SDPA call with the very arguments it
#   gets alone. One SDPA call over the padded batch with a mask takes another kernel path and other
#   kv lengths (measured on SmolLM2 bf16 layers [10, 20), 8 sessions x 10 steps: 9/80 outputs
#   bit-identical to the session alone).
RAGGED_SDPA = "dlis_ragged_sdpa"
HALF = (torch.bfloat16, torch.float16)


def ragged_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Half-precision decode rows on the CPU: one batched float64 computation
    (:func:`decode_attention`); otherwise transformers' SDPA attention, and on a left-padded batch
    row by row over the real slots."""
    if uses_decode_attention(module, query, attention_mask, kwargs):
        return decode_attention(query, key, value, attention_mask, kwargs.get("scaling")), None
    # Padding shows as leading slots that no query of a row may see. Only full-attention layers are
    # ever padded (can_pad below), and there slot 0 is otherwise seen by every query; a sliding
    # window hides early slots for other reasons, so sliding layers always take the plain path.
    padded = (
        attention_mask is not None
        and attention_mask.dtype == torch.bool
        and kwargs.get("sliding_window") is None
        and not bool(attention_mask[:, 0, :, 0].any(dim=-1).all())
    )
    if attention_mask is None or not padded:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return out, None
    q_len = query.shape[2]
    rows = []
    # First real slot of every row, read to the host once per layer (one device sync, not one per row).
    starts: list[int] = attention_mask[:, 0].any(dim=1).to(torch.uint8).argmax(dim=-1).tolist()
    for row, start in enumerate(starts):
        real = key.shape[2] - start
        # Alone, SDPA gets no mask for one query or for a first prefill; else the causal mask.
        mask = None if q_len == 1 or real == q_len else attention_mask[row : row + 1, :, :, start:]
        k, v = key[row : row + 1, :, start:], value[row : row + 1, :, start:]
        out, _ = sdpa_attention_forward(module, query[row : row + 1], k, v, mask, **kwargs)
        rows.append(out)
    return torch.cat(rows), None


def uses_decode_attention(
    module: nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]
) -> bool:
    """Whether a call is a half-precision CPU decode step that :func:`decode_attention` computes: one
    query per row, no sliding window, no dropout, no softcap or attention sinks, and either no mask
    or a boolean mask that only marks padding. fp32 stays on SDPA: there float64 costs 2-4x SDPA's
    time (8 rows of 1500 tokens: 9.3 ms a layer against 2.4), and fp32 sessions are held to the
    summation-order bound anyway, not bit equality (GEMM blocking varies with the batch)."""
    if query.device.type != "cpu" or query.dtype not in HALF or query.shape[2] != 1:
        return False
    if getattr(module, "sinks", None) is not None:
        return False
    if kwargs.get("sliding_window") is not None or kwargs.get("dropout") or kwargs.get("softcap") is not None:
        return False
    return attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.shape[2] == 1)


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
) -> torch.Tensor:
    """One new token per row attending over its cached keys, every row of the batch at once.

    ``query`` ``[B, H, 1, D]``, ``key``/``value`` ``[B, KV, L, D]`` (rows left-padded when
    ``attention_mask``, ``[B, 1, 1, L]`` bool, marks their real slots). The query heads that share a
    KV head attend as one group (no repeated keys). Computed in float64 and rounded once to the
    query's dtype, so a row's result does not depend on the batch or its padding beyond float64
    rounding. Returns ``[B, 1, H, D]``, transformers' attention output layout."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim**-0.5
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim).double()
    scores = torch.matmul(q, key.double().transpose(-1, -2)) * scale  # [B, KV, G, L]
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask[:, 0, 0, :][:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), value.double())  # [B, KV, G, D]
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).to(query.dtype).contiguous()


AttentionInterface.register(RAGGED_SDPA, ragged_sdpa_attention)
AttentionMaskInterface.register(RAGGED_SDPA, sdpa_mask)


class RowStableLinear(nn.Linear):
    """``nn.Linear`` whose lone row goes through the kernel a batch's rows take.

    On CPU, bf16 matmuls of one row take a matrix-vector kernel that rounds differently from
    the matrix-matrix kernel of two or more rows once the inner dimension is large (SmolLM2's
    ``down_proj``, K = 1536: 7 of 64 rows differ from their batched result; K = 576: none). A
    session decoding alone would then drift from the same session batched with others, so its
    tokens would depend on who else is served. A lone row is computed as a batch of two (the row
    and a stride-0 view of it), which every batch size of two or more agrees with bit for bit.

    Half precision only, and only where the kernels disagree (:func:`stabilise_rows`): in bf16 the
    batch of two costs 3-24 % over the matrix-vector kernel, in fp32 twice as much (MKL's sgemm at
    two rows against its sgemv: SmolLM2's fp32 decode ran at 0.75x of HF generate with it). fp32
    GEMM blocking varies with the batch size anyway, so fp32 sessions keep the summation-order
    bound, not bit equality.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        if x.numel() != width:
            return super().forward(x)
        out = nn.functional.linear(x.reshape(1, width).expand(2, width), self.weight, self.bias)[:1]
        return out.reshape(*x.shape[:-1], out.shape[-1])


# (in, out, bias, dtype, device, threads) -> whether a lone row rounds as a batch's rows do
_LONE_ROW_AGREES: dict[tuple[int, int, bool, torch.dtype, str, int], bool] = {}
# outputs a probe compares: where the kernels differ (bf16 on this CPU: K > 1024), 1.1e-4 to
# 2.3e-4 of them do, so ~15-35 differences are expected; where they agree, 0 of 0.3-0.8 M were seen
_PROBE_OUTPUTS = 150_000


def lone_row_agrees(linear: nn.Linear) -> bool:
    """Whether ``linear``'s one-row matmul gives bit for bit what the same row gets in a batch of
    two. Probed once per shape, dtype, device (the weights' own, so a stage is probed after its
    move) and thread count on rows drawn from a fixed seed against the layer's own weights: the
    kernel a matmul takes depends on those, not on the values. The answer fixes the module's class
    at load, so threads are set before loading (the worker and the CLI do). On this machine's CPU,
    bf16 lone rows agree up to K = 1024 and differ from K = 1536 on."""
    weight, bias = linear.weight, linear.bias
    out_features, in_features = weight.shape
    key = (in_features, out_features, bias is not None, weight.dtype, str(weight.device), torch.get_num_threads())
    agrees = _LONE_ROW_AGREES.get(key)
    if agrees is None:
        rows = max(64, -(-_PROBE_OUTPUTS // out_features))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(rows, in_features, generator=gen).to(weight.device, weight.dtype)
        with torch.inference_mode():
            agrees = all(
                torch.equal(
                    nn.functional.linear(x[i : i + 1], weight, bias),
                    nn.functional.linear(x[i : i + 1].expand(2, in_features), weight, bias)[:1],
                )
                for i in range(rows)
            )
        _LONE_ROW_AGREES[key] = agrees
    return agrees


def stabilise_rows(model: nn.Module, prefix: str) -> int:
    """Make every plain half-precision ``nn.Linear`` under ``prefix`` whose lone row would round
    differently from a batch's a :class:`RowStableLinear` (same weights, same module): in bf16 those
    :func:`lone_row_agrees` finds disagreeing, in fp16 all of them (its 10-bit mantissa makes a
    disagreement 8x rarer per output, too rare for the probe's sample to rule out). The others,
    fp32 and quantized linears keep their own kernels: SmolLM2 in bf16 on this CPU keeps six of
    its seven linears per layer plain (K = 576) and stabilises ``down_proj`` (K = 1536). Returns how
    many were changed."""
    changed = 0
    for name, module in model.named_modules():
        if (
            name.startswith(prefix)
            and type(module) is nn.Linear
            and not module.weight.is_meta  # not held by this stage (or a stage on the meta device)
            and (
                module.weight.dtype == torch.float16
                or (module.weight.dtype == torch.bfloat16 and not lone_row_agrees(module))
            )
        ):
            module.__class__ = RowStableLinear
            changed += 1
    return changed


def can_pad(config: PretrainedConfig) -> bool:
    """True when caches of ``config`` are plain full-attention layers, so rows may be padded."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def cache_length(cache: DynamicCache) -> int:
    """Tokens held by ``cache`` (0 before its first step)."""
    return int(cache.get_seq_length())


def stack_caches(caches: list[DynamicCache], config: PretrainedConfig) -> DynamicCache:
    """One cache whose batch holds ``caches`` in order, left-padded with zeros to the longest.

    Caches of different lengths need :func:`can_pad` (plain full-attention layers) and the
    attention mask of :func:`padding_mask`; caches of one length are concatenated as they are.
    """
    out = DynamicCache(config=config)
    for i, layer in enumerate(out.layers):
        sources: list[Any] = [c.layers[i] for c in caches]
        filled = [s for s in sources if s.is_initialized and s.get_seq_length() > 0]
        if not filled:
            continue
        target: Any = layer
        lengths = [s.get_seq_length() if s.is_initialized else 0 for s in sources]
        if len(filled) == len(sources) and len(set(lengths)) == 1:
            keys = torch.cat([s.keys for s in sources], dim=0)
            values = torch.cat([s.values for s in sources], dim=0)
        else:
            if type(target) is not DynamicLayer:
                raise SessionError(
                    f"cache layer {i} is a {type(target).__name__}: sessions at different positions "
                    f"({min(lengths)}..{max(lengths)} tokens) cannot be padded into one batch; run them apart"
                )
            ref = filled[0]
            longest = max(lengths)
            keys = ref.keys.new_zeros((len(sources), ref.keys.shape[1], longest, ref.keys.shape[3]))
            values = ref.values.new_zeros((len(sources), ref.values.shape[1], longest, ref.values.shape[3]))
            for row, (source, n) in enumerate(zip(sources, lengths, strict=True)):
                if n:
                    keys[row, :, longest - n :] = source.keys[0]
                    values[row, :, longest - n :] = source.values[0]
        target.lazy_initialization(keys, values)
        target.keys, target.values = keys, values
        if hasattr(filled[0], "cumulative_length"):
            target.cumulative_length = filled[0].cumulative_length
    return out


def padding_mask(lengths: list[int], new_tokens: int, device: torch.device | None = None) -> torch.Tensor | None:
    """``[B, longest + new_tokens]`` bool mask (on ``device``) of a batch left-padded to the longest of ``lengths``.

    True marks real slots: each row's ``lengths[i]`` cached tokens (at the end of the padded
    part) and the ``new_tokens`` of this step. None when every length is the same (no padding).
    """
    if len(set(lengths)) <= 1:
        return None
    longest = max(lengths)
    slots = torch.arange(longest + new_tokens, device=device).unsqueeze(0)
    first_real = torch.tensor([longest - n for n in lengths], device=device).unsqueeze(1)
    return slots >= first_real


def split_cache(batched: DynamicCache, caches: list[DynamicCache], lengths: list[int] | None = None) -> None:
    """Write row ``i`` of ``batched`` back into ``caches[i]``: its last ``lengths[i]`` slots (all if None).

    Without ``lengths`` rows are views of the batched tensors (no copy; a session's next step
    concatenates a new tensor anyway). With ``lengths`` (a padded batch) each row is copied out,
    so that no session keeps the padding, or the other rows, alive in memory.
    """
    for i, layer in enumerate(batched.layers):
        source: Any = layer
        if not source.is_initialized:
            continue
        total = source.keys.shape[-2]
        for row, cache in enumerate(caches):
            target: Any = cache.layers[i]
            if not target.is_initialized:
                target.lazy_initialization(source.keys, source.values)
            if lengths is None:
                target.keys = source.keys[row : row + 1]
                target.values = source.values[row : row + 1]
            else:
                start = total - lengths[row]
                target.keys = source.keys[row : row + 1, :, start:].clone()
                target.values = source.values[row : row + 1, :, start:].clone()
            if hasattr(source, "cumulative_length"):
                target.cumulative_length = source.cumulative_length
