"""Activation fingerprints: a stage's compact commitment to its output hidden states (TOPLOC-style).

Why: re-executing a stage call to check it (a decode replay, one step at a time) costs as much as
the call. A fingerprint lets a checker validate the whole call with ONE prefill over the stage,
and costs the worker ~8 bytes per token to publish.

**Commitment.** The hidden states a stage emitted (``[T, H]``, one row per token position, in
position order) are cut into chunks of ``chunk_tokens`` positions. Per chunk the ``topk`` entries
of largest magnitude (flattened index ``t * H + h``, values rounded to bfloat16) are the points
``(index mod p, bf16 bits)`` of a polynomial of degree ``topk - 1`` over GF(p); only its ``topk``
coefficients (2 bytes each) and ``p`` are stored. Unlike TOPLOC, the ``topk`` entries are shared
evenly among the chunk's tokens (``topk / chunk_tokens`` = 4 largest of each token), not the
largest of the flattened chunk: a few tokens with huge activations (attention sinks) would
otherwise take every slot and leave the other tokens of the chunk unchecked, so one corrupted
token could go unseen. ``p`` is a prime above ``0xFF80`` (every finite bf16 bit pattern is below
it, so values are recovered exactly) under which the chunk's indices stay distinct.

**Validation.** The checker recomputes the hidden states, takes its OWN top-k indices per chunk
and evaluates the polynomial there: where the index was committed too it recovers the committed
value; elsewhere it gets noise, which almost never has the right sign and exponent. It then
counts sign/exponent mismatches and takes the mean and median mantissa difference (in bf16 units,
0-127) of the entries whose exponents agree (TOPLOC's measures), plus the worst token's summed
error (one corrupted token), and compares them with
:class:`~dlis_market.protocol.fingerprint_thresholds.Thresholds`.

Wire format (little endian): header ``<BBHII`` = version, chunk_tokens, topk, hidden size,
tokens; then per chunk ``<H`` p and ``k`` ``<H`` coefficients, ``k = rows * per_token(...)``.
Thresholds per shard dtype: :mod:`dlis_market.protocol.fingerprint_thresholds`.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dlis_market.protocol.errors import FingerprintError, FingerprintFormatError, FingerprintShapeError

FORMAT_VERSION = 1
CHUNK_TOKENS = 32
DEFAULT_TOPK = 128
# Primes in (0xFF80, 2**16): every finite bf16 bit pattern (0x0000-0x7F7F, 0x8000-0xFF7F) is below
# them. Tried in order until the chunk's indices are distinct modulo one (always the first while
# chunk_tokens x hidden < 65497).
PRIMES = (65497, 65479, 65449, 65447, 65437, 65423, 65419, 65413, 65519, 65521)
_HEADER = struct.Struct("<BBHII")
SLACK = 2  # extra entries per token the checker looks up for the per-token measure (not on the wire)
_ABS_INF = 0x7F80  # bf16 bits without the sign: inf here, NaN above; finite values below


def bf16_bits(hidden: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[T, H]`` values -> their bfloat16 bit patterns (uint16), rounded to nearest even."""
    t = torch.as_tensor(hidden).detach()
    if t.ndim != 2:
        raise FingerprintShapeError(f"hidden states must be [tokens, hidden], got shape {tuple(t.shape)}")
    bits = t.to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16).numpy()
    return bits.view(np.uint16)


@functools.lru_cache(maxsize=len(PRIMES))
def _inverses(p: int) -> np.ndarray:
    """Multiplicative inverses of 0..p-1 modulo p (0 maps to 0), by Fermat: a**(p-2)."""
    base = np.arange(p, dtype=np.int64)
    out = np.ones(p, dtype=np.int64)
    e = p - 2
    while e:
        if e & 1:
            out = out * base % p
        base = base * base % p
        e >>= 1
    return out


def _pick_modulus(indices: np.ndarray) -> tuple[int, np.ndarray]:
    """The first prime of :data:`PRIMES` under which ``indices`` stay distinct, and the kept
    indices (all of them; if no prime works, lower-ranked colliding ones are dropped)."""
    for p in PRIMES:
        if np.unique(indices % p).size == indices.size:
            return p, indices
    p = PRIMES[0]
    _, first = np.unique(indices % p, return_index=True)
    return p, indices[np.sort(first)]


def interpolate(xs: np.ndarray, ys: np.ndarray, p: int) -> np.ndarray:
    """Coefficients (lowest degree first, ``len(xs)`` of them) of the polynomial over GF(p)
    through the points ``(xs[i], ys[i])``; ``xs`` distinct mod p. Newton divided differences,
    then expanded to monomial form so a reader needs no nodes."""
    inv = _inverses(p)
    x = xs.astype(np.int64) % p
    c = ys.astype(np.int64) % p
    k = x.size
    for j in range(1, k):
        c[j:] = (c[j:] - c[j - 1 : k - 1]) % p * inv[(x[j:] - x[: k - j]) % p] % p
    coeffs = np.zeros(k, dtype=np.int64)
    coeffs[0] = c[k - 1]
    for j in range(k - 2, -1, -1):  # coeffs <- coeffs * (X - x_j) + c_j
        deg = k - 1 - j  # degree after the multiplication
        shifted = np.concatenate(([0], coeffs[:deg]))
        shifted[:deg] -= x[j] * coeffs[:deg] % p
        shifted[0] += c[j]
        coeffs[: deg + 1] = shifted % p
    return coeffs


def evaluate(coeffs: np.ndarray, xs: np.ndarray, p: int) -> np.ndarray:
    """The polynomial ``coeffs`` (lowest degree first) at every ``xs`` modulo p (Horner)."""
    x = xs.astype(np.int64) % p
    acc = np.zeros(x.shape, dtype=np.int64)
    for a in coeffs[::-1].astype(np.int64):
        acc = (acc * x + a) % p
    return acc


def top_indices(bits: np.ndarray, per_token: int) -> np.ndarray:
    """Flat indices (``t * H + h``) of the ``per_token`` entries of largest magnitude of every row
    of bf16 ``bits`` ``[rows, H]``, row by row, largest first.

    The magnitude of a finite bf16 orders as its bits without the sign; ties go to the lower
    index, so committer and checker break them alike."""
    mag = (bits & 0x7FFF).astype(np.int32)
    order = np.argsort(-mag, axis=1, kind="stable")[:, :per_token]
    return (order + np.arange(bits.shape[0])[:, None] * bits.shape[1]).reshape(-1).astype(np.int64)


def per_token(topk: int, chunk_tokens: int, hidden: int) -> int:
    """Entries committed per token: ``topk`` per chunk shared evenly, at most the hidden size."""
    return max(1, min(topk // chunk_tokens, hidden))


def _check_params(topk: int, chunk_tokens: int) -> None:
    if not 1 <= chunk_tokens <= 255 or not chunk_tokens <= topk <= 0xFFFF or topk % chunk_tokens:
        raise FingerprintError(
            f"chunk_tokens {chunk_tokens} must be in [1, 255] and topk {topk} a multiple of it below 65536 "
            f"(default: {DEFAULT_TOPK} per {CHUNK_TOKENS} tokens)"
        )


@dataclass(frozen=True)
class ChunkPoly:
    """One chunk's commitment: the prime and the polynomial's coefficients."""

    modulus: int
    coeffs: np.ndarray  # int64 in [0, modulus), lowest degree first


def commit_chunk(bits: np.ndarray, r: int) -> ChunkPoly:
    """The commitment to one chunk of bf16 ``bits`` ``[rows, H]``, ``r`` entries per row."""
    if int((bits & 0x7FFF).max(initial=0)) >= _ABS_INF:
        raise FingerprintError(
            "hidden states hold inf or NaN: nothing checkable can be committed; the stage's output is broken"
        )
    idx = top_indices(bits, r)
    k = idx.size
    p, idx = _pick_modulus(idx)
    coeffs = interpolate(idx % p, bits.reshape(-1)[idx].astype(np.int64), p)
    if coeffs.size < k:  # colliding indices were dropped: pad with zeros
        coeffs = np.concatenate((coeffs, np.zeros(k - coeffs.size, dtype=np.int64)))
    return ChunkPoly(p, coeffs)


@dataclass(frozen=True)
class Fingerprint:
    """A stage call's commitment to its ``num_tokens x hidden_size`` output hidden states."""

    chunk_tokens: int
    topk: int
    hidden_size: int
    num_tokens: int
    chunks: tuple[ChunkPoly, ...]
    version: int = FORMAT_VERSION

    def chunk_rows(self, i: int) -> int:
        return min(self.chunk_tokens, self.num_tokens - i * self.chunk_tokens)

    def to_bytes(self) -> bytes:
        parts = [_HEADER.pack(self.version, self.chunk_tokens, self.topk, self.hidden_size, self.num_tokens)]
        for chunk in self.chunks:
            parts.append(struct.pack("<H", chunk.modulus))
            parts.append(chunk.coeffs.astype("<u2").tobytes())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Fingerprint:
        """Parse and check every field; :class:`FingerprintFormatError` for anything off."""
        if len(data) < _HEADER.size:
            raise FingerprintFormatError(
                f"fingerprint of {len(data)} bytes is shorter than its {_HEADER.size}-byte header; "
                "it was truncated: ask the worker for the bytes its receipt signs"
            )
        version, chunk_tokens, topk, hidden, tokens = _HEADER.unpack_from(data)
        if version != FORMAT_VERSION:
            raise FingerprintFormatError(f"fingerprint version {version}, this reader knows {FORMAT_VERSION}")
        if chunk_tokens < 1 or topk < chunk_tokens or topk % chunk_tokens or hidden < 1 or tokens < 1:
            raise FingerprintFormatError(
                f"fingerprint header chunk_tokens={chunk_tokens} topk={topk} hidden={hidden} tokens={tokens}: "
                "each must be at least 1 and topk a multiple of chunk_tokens"
            )
        want = _expected_bytes(tokens, hidden, topk, chunk_tokens)
        if len(data) != want:
            raise FingerprintFormatError(
                f"fingerprint of {len(data)} bytes; its header ({tokens} tokens, hidden {hidden}, top-{topk} "
                f"per {chunk_tokens} tokens) needs exactly {want}: truncated or padded"
            )
        chunks, off = [], _HEADER.size
        for i, k in enumerate(_chunk_sizes(tokens, hidden, topk, chunk_tokens)):
            (p,) = struct.unpack_from("<H", data, off)
            coeffs = np.frombuffer(data, dtype="<u2", count=k, offset=off + 2).astype(np.int64)
            off += 2 + 2 * k
            if p not in PRIMES:
                raise FingerprintFormatError(f"chunk {i}: modulus {p} is not one of the allowed primes {PRIMES}")
            if coeffs.size and int(coeffs.max()) >= p:
                raise FingerprintFormatError(f"chunk {i}: coefficient {int(coeffs.max())} is not below modulus {p}")
            chunks.append(ChunkPoly(p, coeffs))
        return cls(chunk_tokens, topk, hidden, tokens, tuple(chunks), version)


def commit(
    hidden: torch.Tensor | np.ndarray, topk: int = DEFAULT_TOPK, chunk_tokens: int = CHUNK_TOKENS
) -> Fingerprint:
    """The fingerprint of hidden states ``[T, H]`` (all positions of one call, in order)."""
    _check_params(topk, chunk_tokens)
    bits = bf16_bits(hidden)
    if bits.shape[0] == 0 or bits.shape[1] == 0:
        raise FingerprintShapeError("no hidden states to commit to: a call covers at least one token")
    r = per_token(topk, chunk_tokens, bits.shape[1])
    chunks = tuple(commit_chunk(bits[s : s + chunk_tokens], r) for s in range(0, bits.shape[0], chunk_tokens))
    return Fingerprint(chunk_tokens, topk, bits.shape[1], bits.shape[0], chunks)


class FingerprintBuilder:
    """Builds a fingerprint while a stage decodes: feed each step's rows (the prefill's ``[P, H]``,
    then ``[1, H]`` per decode step); every full chunk is committed as soon as it fills, so the
    cost is spread over the steps and only ``chunk_tokens`` rows are ever held."""

    def __init__(self, topk: int = DEFAULT_TOPK, chunk_tokens: int = CHUNK_TOKENS) -> None:
        _check_params(topk, chunk_tokens)
        self.topk, self.chunk_tokens = topk, chunk_tokens
        self.hidden_size: int | None = None
        self.num_tokens = 0
        self._pending: list[np.ndarray] = []
        self._chunks: list[ChunkPoly] = []

    def add(self, rows: torch.Tensor | np.ndarray) -> None:
        bits = bf16_bits(torch.as_tensor(rows).reshape(-1, torch.as_tensor(rows).shape[-1]))
        if self.hidden_size is None:
            self.hidden_size = bits.shape[1]
        elif bits.shape[1] != self.hidden_size:
            raise FingerprintShapeError(f"rows of width {bits.shape[1]} after rows of width {self.hidden_size}")
        self._pending.append(bits)
        self.num_tokens += bits.shape[0]
        held = sum(b.shape[0] for b in self._pending)
        if held >= self.chunk_tokens:
            block = np.concatenate(self._pending)
            full = held - held % self.chunk_tokens
            r = per_token(self.topk, self.chunk_tokens, self.hidden_size)
            for s in range(0, full, self.chunk_tokens):
                self._chunks.append(commit_chunk(block[s : s + self.chunk_tokens], r))
            self._pending = [block[full:]] if full < held else []

    def finish(self) -> Fingerprint:
        if self.hidden_size is None or self.num_tokens == 0:
            raise FingerprintShapeError("no hidden states were added: a call covers at least one token")
        chunks = list(self._chunks)
        if self._pending:
            r = per_token(self.topk, self.chunk_tokens, self.hidden_size)
            chunks.append(commit_chunk(np.concatenate(self._pending), r))
        return Fingerprint(self.chunk_tokens, self.topk, self.hidden_size, self.num_tokens, tuple(chunks))


@dataclass(frozen=True)
class ChunkScore:
    """How one chunk's recomputed top entries compare with the commitment."""

    chunk: int
    compared: int  # the checker's top entries looked up
    exp_mismatches: int  # of those, sign or exponent differs (or the index was not committed)
    mant_err_mean: float  # |mantissa difference| in bf16 units (0-127), where sign+exponent agree
    mant_err_median: float
    worst_token_err: float  # the worst token's summed error (units of 2**-7 relative, 32 at most each)
    worst_token: int  # its position in the call


def _as_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def score_chunk(chunk: ChunkPoly, bits: np.ndarray, index: int, r: int, first_token: int) -> ChunkScore:
    """Compare the checker's bf16 ``bits`` ``[rows, H]`` of one chunk with its commitment.

    TOPLOC's measures read the checker's own top ``r`` entries per token. The per-token measure
    also looks ``SLACK`` entries further and keeps the ``r`` best matches, so an honest swap of
    the r-th and (r+1)-th largest entries (near-equal values, rounded differently) is explained
    rather than counted as an uncommitted entry."""
    rows, width = bits.shape
    if rows * r != chunk.coeffs.size:
        raise FingerprintShapeError(
            f"chunk {index} commits {chunk.coeffs.size} entries, its {rows} rows give {rows * r}"
        )
    depth = min(r + SLACK, width)
    idx = top_indices(bits, depth)
    mine = bits.reshape(-1)[idx].astype(np.int64)
    theirs = evaluate(chunk.coeffs, idx, chunk.modulus)
    finite = (theirs & 0x7FFF) < _ABS_INF
    # Per entry: relative difference in 2**-7 units (a bf16 mantissa step), capped at 32 so an
    # uncommitted index (the polynomial gives noise there) weighs as "far off" and no more.
    a, b = _as_float(mine), _as_float(np.where(finite, theirs, 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.abs(a - b) / np.maximum(np.abs(a), np.abs(b)) * 128
    err = np.where(finite, np.nan_to_num(np.minimum(rel, 32.0), nan=0.0), 32.0).reshape(rows, depth)
    per_token_err = np.sort(err, axis=1)[:, :r].sum(axis=1)
    worst = int(per_token_err.argmax())
    top = np.zeros((rows, depth), dtype=bool)
    top[:, :r] = True  # TOPLOC's measures: the checker's own top r of each token
    mine, theirs, finite = mine[top.reshape(-1)], theirs[top.reshape(-1)], finite[top.reshape(-1)]
    same = finite & ((mine >> 7) == (theirs >> 7))
    mant = np.abs((mine & 0x7F) - (theirs & 0x7F))[same]
    return ChunkScore(
        chunk=index,
        compared=int(mine.size),
        exp_mismatches=int(mine.size - same.sum()),
        mant_err_mean=float(mant.mean()) if mant.size else 128.0,
        mant_err_median=float(np.median(mant)) if mant.size else 128.0,
        worst_token_err=float(per_token_err[worst]),
        worst_token=first_token + worst,
    )


def score(fingerprint: Fingerprint, hidden: torch.Tensor | np.ndarray) -> list[ChunkScore]:
    """Score every chunk of ``fingerprint`` against recomputed hidden states ``[T, H]``."""
    bits = bf16_bits(hidden)
    if int((bits & 0x7FFF).max(initial=0)) >= _ABS_INF:
        raise FingerprintError("the recomputed hidden states hold inf or NaN: the checker's own stage is broken")
    if bits.shape != (fingerprint.num_tokens, fingerprint.hidden_size):
        raise FingerprintShapeError(
            f"fingerprint covers {fingerprint.num_tokens} tokens x hidden {fingerprint.hidden_size}, the recomputed "
            f"states are {bits.shape[0]} x {bits.shape[1]}: it commits to another call (or another model)"
        )
    c = fingerprint.chunk_tokens
    r = per_token(fingerprint.topk, c, fingerprint.hidden_size)
    return [score_chunk(ch, bits[i * c : (i + 1) * c], i, r, i * c) for i, ch in enumerate(fingerprint.chunks)]


def _chunk_sizes(num_tokens: int, hidden_size: int, topk: int, chunk_tokens: int) -> list[int]:
    r = per_token(topk, chunk_tokens, hidden_size)
    return [min(chunk_tokens, num_tokens - s) * r for s in range(0, num_tokens, chunk_tokens)]


def _expected_bytes(num_tokens: int, hidden_size: int, topk: int, chunk_tokens: int) -> int:
    """Bytes of a fingerprint with this header, without building per-chunk lists (the header is
    untrusted: it may claim 2**32 tokens)."""
    r = per_token(topk, chunk_tokens, hidden_size)
    full, rest = divmod(num_tokens, chunk_tokens)
    return _HEADER.size + full * (2 + 2 * chunk_tokens * r) + (2 + 2 * rest * r if rest else 0)


def fingerprint_size(
    num_tokens: int, hidden_size: int, topk: int = DEFAULT_TOPK, chunk_tokens: int = CHUNK_TOKENS
) -> int:
    """Bytes of the fingerprint of ``num_tokens`` positions (what a receipt carries)."""
    return _expected_bytes(num_tokens, hidden_size, topk, chunk_tokens)


def fingerprint_from_steps(
    steps: Sequence[torch.Tensor], topk: int = DEFAULT_TOPK, chunk_tokens: int = CHUNK_TOKENS
) -> bytes:
    """The fingerprint bytes of one session's call from the rows its stage emitted, in order: the
    prefill's ``[P, H]`` (or ``[1, P, H]``), then ``[1, H]`` per decode step."""
    builder = FingerprintBuilder(topk, chunk_tokens)
    for rows in steps:
        builder.add(rows)
    return builder.finish().to_bytes()


def commits_to(fingerprint: bytes, steps: Sequence[torch.Tensor]) -> bool:
    """Whether ``fingerprint`` is exactly the fingerprint of the rows a stage sent (``steps``, as
    in :func:`fingerprint_from_steps`). Without this a worker could commit to honest states and
    send others: the next stage, fed what was sent, would pass its own check. Costs no forward
    pass; raises :class:`~dlis_market.protocol.fingerprints.FingerprintFormatError` for bytes
    that do not parse."""
    fp = Fingerprint.from_bytes(fingerprint)
    return fingerprint_from_steps(steps, fp.topk, fp.chunk_tokens) == fingerprint
