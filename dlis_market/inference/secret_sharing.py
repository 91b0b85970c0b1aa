"""Linear layers on secret-shared inputs, and secure aggregation of partial sums.

Two-party additive sharing over the ring Z/2^64 (int64 arithmetic wraps, so torch's integer
matmul computes in the ring). A client encodes its activations ``x`` in fixed point, draws a
uniformly random ``r`` and sends ``r`` to one worker and ``x - r`` to another worker of a
different operator. Each multiplies its share by the public weights (also fixed point); the
client adds the two answers and gets ``x @ W`` to within the fixed-point rounding.

What each party learns, exactly:
- each worker sees one share: a uniformly random ring element, independent of ``x`` (perfect
  secrecy, whatever its computing power) — it learns the shapes (tokens x width) and timing;
- the two workers together (if their operators collude) learn ``x``;
- the client learns ``x @ W``; whoever it later sends results of the layer to learns those.

Fixed point: ``x`` with ``x_bits`` fraction bits, ``W`` with ``w_bits``; the product has
``x_bits + w_bits``. The answer is right only while ``|x @ W|`` fits in 63 bits;
:meth:`FixedPoint.check_headroom` refuses inputs that could overflow, with the numbers.

Secure aggregation (:func:`pairwise_masks`): members of a group that sum partial results (a
head-parallel group's row-parallel projections) add masks that cancel in the sum, derived from
pairwise secrets, so the aggregator learns the sum and nothing about any member's partial.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from dlis_market.inference.errors import SecretSharingError

RING_BITS = 64


def _random_ring(shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform elements of Z/2^64 from the OS's CSPRNG."""
    n = math.prod(shape)
    return torch.from_numpy(np.frombuffer(secrets.token_bytes(8 * n), dtype=np.int64).copy()).reshape(shape)


def _stream(key: bytes, n: int) -> torch.Tensor:
    """``n`` ring elements from ChaCha20 keyed by ``key`` (a pairwise mask)."""
    enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    data = enc.update(bytes(8 * n))
    return torch.from_numpy(np.frombuffer(data, dtype=np.int64).copy())


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point encoding into Z/2^64: ``x_bits`` fraction bits for activations, ``w_bits`` for weights."""

    x_bits: int = 20
    w_bits: int = 20

    def encode_x(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x.double() * 2.0**self.x_bits).to(torch.int64)

    def encode_w(self, w: torch.Tensor) -> torch.Tensor:
        return torch.round(w.double() * 2.0**self.w_bits).to(torch.int64)

    def decode(self, y: torch.Tensor) -> torch.Tensor:
        """A product's ring elements (as signed int64) back to floats."""
        return (y.double() / 2.0 ** (self.x_bits + self.w_bits)).float()

    def check_headroom(self, x: torch.Tensor, row_abs_sum: float) -> None:
        """Refuse ``x @ W.T`` when its largest possible magnitude could wrap around the ring
        (``row_abs_sum``: the largest sum of |weights| over one output, :attr:`SharedLinear.row_abs_sum`)."""
        x_max = float(x.abs().max())
        bound = x_max * row_abs_sum * 2.0 ** (self.x_bits + self.w_bits)
        if bound >= 2.0 ** (RING_BITS - 2):
            raise SecretSharingError(
                f"|x| up to {x_max:.3g} times weight rows summing to {row_abs_sum:.3g} needs "
                f"{math.log2(bound):.1f} bits at {self.x_bits}+{self.w_bits} fraction bits, over the "
                f"{RING_BITS - 2} a 64-bit ring holds with headroom: use fewer fraction bits"
            )


def share(x_ring: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two additive shares of ``x_ring`` (int64): each alone is uniformly random."""
    r = _random_ring(tuple(x_ring.shape))
    return r, x_ring - r  # wraps mod 2^64


def reconstruct(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape != b.shape or a.dtype != torch.int64 or b.dtype != torch.int64:
        raise SecretSharingError(f"shares must be int64 of one shape, got {a.dtype}{tuple(a.shape)} "
                                 f"and {b.dtype}{tuple(b.shape)}")  # fmt: skip
    return a + b


class SharedLinear:
    """What a worker holds to serve one linear layer on shares: the layer's weights in fixed point
    (``weight`` is ``[out, in]`` as in ``nn.Linear``; several layers may be stacked on ``out``)."""

    def __init__(self, weight: torch.Tensor, codec: FixedPoint):
        self.codec = codec
        weight = weight.detach().float()
        self.row_abs_sum = float(weight.abs().sum(dim=1).max())
        self.w_ring_t = codec.encode_w(weight).t().contiguous()  # [in, out]

    def apply(self, share_ring: torch.Tensor) -> torch.Tensor:
        """One share of the input ``[tokens, in]`` -> that share of the output ``[tokens, out]``."""
        if share_ring.dtype != torch.int64 or share_ring.shape[-1] != self.w_ring_t.shape[0]:
            raise SecretSharingError(
                f"a share must be int64 [tokens, {self.w_ring_t.shape[0]}], got {share_ring.dtype}"
                f"{tuple(share_ring.shape)}"
            )
        return share_ring @ self.w_ring_t


def private_linear(x: torch.Tensor, left: SharedLinear, right: SharedLinear) -> torch.Tensor:
    """``x @ W.T`` computed by two workers that each see one share of ``x`` (the client's side:
    encode, share, send one share to each, add the answers, decode). In-process here; over the
    wire each share travels as 8 bytes per element."""
    codec = left.codec
    codec.check_headroom(x, max(left.row_abs_sum, right.row_abs_sum))
    a, b = share(codec.encode_x(x))
    return codec.decode(reconstruct(left.apply(a), right.apply(b)))


# ------------------------------------------------------------------------ secure aggregation


def pair_key(secret: bytes, i: int, j: int, label: bytes) -> bytes:
    """The 32-byte ChaCha20 key members ``i`` and ``j`` share for one aggregation ``label`` (derived
    from their pairwise secret, e.g. an X25519 agreement; one label per step, never reused)."""
    lo, hi = min(i, j), max(i, j)
    return hashlib.sha256(b"dlis-secagg" + secret + lo.to_bytes(4, "big") + hi.to_bytes(4, "big") + label).digest()


def pairwise_masks(member: int, size: int, numel: int, keys: dict[int, bytes]) -> torch.Tensor:
    """Member ``member``'s mask: + stream(k_ij) for every j > member, - stream(k_ji) for j < member.
    The masks of all ``size`` members sum to zero mod 2^64."""
    mask = torch.zeros(numel, dtype=torch.int64)
    for other in range(size):
        if other == member:
            continue
        if other not in keys:
            raise SecretSharingError(f"member {member} has no pairwise key with member {other} of {size}")
        s = _stream(keys[other], numel)
        mask = mask + s if other > member else mask - s
    return mask


def masked_partial(
    partial: torch.Tensor, member: int, size: int, keys: dict[int, bytes], codec: FixedPoint
) -> torch.Tensor:
    """A member's partial sum (float) as it leaves the member: fixed point plus its mask."""
    ring = torch.round(partial.double() * 2.0**codec.x_bits).to(torch.int64)
    return ring + pairwise_masks(member, size, ring.numel(), keys).reshape(ring.shape)


def aggregate(masked: list[torch.Tensor], size: int, codec: FixedPoint) -> torch.Tensor:
    """The sum of every member's partial. The masks cancel only when all ``size`` members are in:
    with one missing the sum is noise, so it is refused."""
    if len(masked) != size or not masked:
        raise SecretSharingError(
            f"{len(masked)} of {size} members' partials: the pairwise masks cancel only in the sum of all "
            "of them; wait for the missing members or start the step again without them"
        )
    total = torch.zeros_like(masked[0])
    for m in masked:
        total = total + m
    return (total.double() / 2.0**codec.x_bits).float()
