"""When a recomputed stage call matches its fingerprint: thresholds per shard dtype and the verdict.

Why a table: a checker's prefill never reproduces a decode bit for bit (other matmul shapes,
kernels, threads, hardware), and the gap grows as precision drops; a threshold tight enough for
fp32 would accuse every honest nf4 worker. The worker claims its shard dtype (manifest, span
record), the checker runs a stage of that dtype (bf16 claims may also be checked in fp32) and
judges with that dtype's row. Measured by ``bench/fingerprints.py`` (SmolLM2-135M, 3 stages of
10 layers, see ``bench/results/fingerprints.json``); the numbers behind each default are in its
comment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dlis_market.protocol.errors import FingerprintError
from dlis_market.protocol.fingerprints import ChunkScore, Fingerprint, score


@dataclass(frozen=True)
class Thresholds:
    """A chunk passes when every measure is at or under its limit (TOPLOC's three, plus one per token).

    - ``max_exp_mismatch_frac``: share of the checker's top-k entries whose sign or bf16 exponent
      differs from the committed value (an index the worker did not commit reads as noise and
      counts here): catches other values, other inputs, and top-k sets that moved.
    - ``max_mant_err_mean`` / ``max_mant_err_median``: mantissa difference in bf16 units (1 unit =
      2**-7 relative) over the entries whose exponents agree: catches lower precision overall.
    - ``max_token_err``: the worst token's summed error over its entries (relative difference in
      2**-7 units, 32 at most per entry; an entry the worker did not commit counts 32). One
      corrupted token among 32 moves the chunk's mean little but not its own sum.
    """

    max_exp_mismatch_frac: float
    max_mant_err_mean: float
    max_mant_err_median: float
    max_token_err: float

    def failures(self, s: ChunkScore) -> list[str]:
        """Which limits chunk ``s`` breaks, with the numbers (empty: it passes)."""
        out = []
        if s.exp_mismatches > self.max_exp_mismatch_frac * s.compared:
            out.append(f"{s.exp_mismatches}/{s.compared} exponent mismatches > {self.max_exp_mismatch_frac:.0%}")
        if s.mant_err_mean > self.max_mant_err_mean:
            out.append(f"mean mantissa error {s.mant_err_mean:.2f} > {self.max_mant_err_mean}")
        if s.mant_err_median > self.max_mant_err_median:
            out.append(f"median mantissa error {s.mant_err_median:.1f} > {self.max_mant_err_median}")
        if s.worst_token_err > self.max_token_err:
            out.append(f"token {s.worst_token} off by {s.worst_token_err:.1f} > {self.max_token_err}")
        return out

    def margin(self, s: ChunkScore) -> float:
        """The largest measure / limit ratio of a chunk (< 1: passes; the bench reports it)."""
        return max(
            s.exp_mismatches / max(self.max_exp_mismatch_frac * s.compared, 1e-9),
            s.mant_err_mean / self.max_mant_err_mean,
            s.mant_err_median / max(self.max_mant_err_median, 1e-9),
            s.worst_token_err / self.max_token_err,
        )


# Defaults per shard dtype (the dtype the worker claims), set from bench/fingerprints.py run 1
# (SmolLM2-135M, 24 calls x 3 stages, 37 positions median, CPU): the worst honest chunk of the
# committer -> checker pairs, and the mildest cheat, per measure (exp frac / mean / median / token):
#   fp32  honest fp32->fp32 0 / 0.05 / 0 / 0.6;        bf16 claimed as fp32: mean >= 0.62
#   bf16  honest bf16->bf16 and bf16->fp32 0.125 / 1.83 / 2 / 38;  nf4 as bf16: mean >= 5.2;
#         int8 as bf16: mean >= 2.4 at [0, 10), >= 4.3 at [20, 30), but 2.0 at [10, 20) (missed)
#   int8  honest int8->int8 0.25 / 8.1 / 6 / 59 (decode vs prefill drifts through int8 rounding)
#   nf4   honest nf4->nf4 0.094 / 2.1 / 2 / 34
#   --byzantine noise: mean >= 8.0, token >= 61 at [0, 10), 128 at [10, 20)
# A token error of ~32-38 is one near-tied entry outside the checker's top 4 + SLACK; two is a
# corrupted token. Run 2 (the same 24 prompts, 40 new tokens; bench/results/fingerprints.json):
# no honest call rejected (worst margin 0.79), noise and shifted ids 24/24 per stage, nf4 as bf16
# and bf16 as fp32 24/24, int8 as bf16 24/24, 20/24, 24/24, nf4 as int8 only 13/24, 1/24, 23/24.
THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(0.05, 0.35, 0.5, 40.0),
    "bf16": Thresholds(0.25, 2.5, 3.0, 48.0),
    "int8": Thresholds(0.40, 12.0, 10.0, 80.0),
    "nf4": Thresholds(0.25, 3.5, 3.0, 48.0),
}


def thresholds_for(dtype: str) -> Thresholds:
    if dtype not in THRESHOLDS:
        raise FingerprintError(f"no fingerprint thresholds for shard dtype {dtype!r}; known: {', '.join(THRESHOLDS)}")
    return THRESHOLDS[dtype]


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one call's fingerprint: ``accepted`` iff every chunk passes."""

    accepted: bool
    chunks: tuple[ChunkScore, ...]
    failures: tuple[str, ...]  # "chunk i: reason" for each failing chunk
    margin: float  # worst chunk's measure / limit ratio (< 1 accepted)

    @property
    def reason(self) -> str:
        return "; ".join(self.failures) if self.failures else "all chunks within thresholds"


def judge(scores: Sequence[ChunkScore], thresholds: Thresholds) -> Verdict:
    failures = [f"chunk {s.chunk}: {', '.join(f)}" for s in scores if (f := thresholds.failures(s))]
    margin = max((thresholds.margin(s) for s in scores), default=0.0)
    return Verdict(not failures, tuple(scores), tuple(failures), margin)


def validate(fingerprint: Fingerprint | bytes, hidden: torch.Tensor | np.ndarray, thresholds: Thresholds) -> Verdict:
    """Check recomputed hidden states ``[T, H]`` against a fingerprint (or its bytes).

    Raises :class:`~dlis_market.protocol.fingerprints.FingerprintFormatError` for bytes that do
    not parse and :class:`~dlis_market.protocol.fingerprints.FingerprintShapeError` when they
    describe another number of tokens or another hidden size.
    """
    fp = Fingerprint.from_bytes(fingerprint) if isinstance(fingerprint, bytes | bytearray) else fingerprint
    return judge(score(fp, hidden), thresholds)
