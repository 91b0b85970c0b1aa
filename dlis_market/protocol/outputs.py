"""Stage outputs compared across replicas: decoding, the per-token measure and its tolerances.

Shared by the spot-check runner (the broker compares before it builds evidence) and the oracle
(which decides on the evidence): one measure, one table, so the two cannot disagree.

**Outputs.** A stage's receipt commits ``outputHash = sha256(concatenated raw output rows)``
(see ``node/receipts.py``). Evidence carries both raw outputs; the oracle checks each against its
signed receipt, decodes them (float32 / bfloat16 / float16 / int64, little endian), splits them
into tokens (``row_width`` values each: the hidden size) and compares the worst token's relative
L2 error ``max_t ||a_t - b_t|| / max(||a_t||, ||b_t||)`` with the tolerance of the shard dtype.
Per token, because models such as SmolLM2 carry a few huge activations in some tokens only: an
error relative to the largest value anywhere (the first measure used here) hid an nf4 model
served as bf16 on real weights (4.7e-2, under any bf16 tolerance that leaves room for rounding).

**Tolerances** (:data:`TOLERANCES`). Two honest workers running the *same* shard on the same
input differ by floating-point re-association (threads, batch composition, kernels) and, across
hardware, by different kernels altogether. Measured (2026-11-27), worst token's relative L2:

* CPU, random Llama (hidden 256, 2 layers, prefill 8 + 6 decode steps, 4 prompts), one thread
  alone vs two threads batched among 4 (``tests/unit/oracle/tolerance_measure.py``);
* CPU vs an NVIDIA H100 (torch 2.11, bitsandbytes 0.50.2), SmolLM2-135M's real layers [10, 18)
  (and [10, 16): how errors grow with depth), 6 prompts, alone and batched, fp32 with and
  without TF32 (``bench/gpu_tolerance.py``).

=====  ===========  ============================  =========================================  =========
dtype  honest, CPU  honest, CPU vs H100, 8 (6)    cheats (CPU random / H100 real, 8 layers)  tolerance
=====  ===========  ============================  =========================================  =========
fp32   4.6e-7       6.2e-7; TF32 3.6e-4 (3.5e-4)  bf16 6.7e-3 / 1.2e-2, int8 1.6e-2          2e-3
bf16   0            9.2e-3 (6.6e-3)               int8 1.8e-2 / 6.6e-2, nf4 0.19 / 0.17      4e-2
int8   0            6.9e-2 (6.8e-2)               nf4 0.19 / 0.19                            0.12
nf4    0            1.3e-2 (1.2e-2)               wrong input 0.59                           0.1
ids    --           --                            --                                         0 (exact)
=====  ===========  ============================  =========================================  =========

Honest bf16 across hardware grows with depth (6.6e-3 over 6 layers, 9.2e-3 over 8), so its
tolerance keeps 4x room over the 8-layer figure, at the price of catching int8 served as bf16
only on real weights (6.6e-2; 1.8e-2 on the random model). int8 across CPU and GPU, whose
bitsandbytes kernels differ, has the least margin on both sides (0.069 honest, 0.19 for nf4
passed off as int8, tolerance 0.12): where checkers run other hardware than the accused, require
a referee. Every dtype catches nf4 served in its place and wrong inputs (0.58-0.59, measured on
CPU for every dtype). ``ids`` (sampled token ids at the last stage) may differ in one token per 16 (a near-tie of
the two top tokens flipped by other hardware; the replay is teacher-forced, so a flip stays one
token); shorter calls must match exactly.

A faulty or lazy worker (random output, skipped layers, wrong weights or inputs) differs by
0.2-1.4 on this scale (a ``--byzantine`` worker's noise of half the RMS: about 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ShardDtype = Literal["fp32", "bf16", "int8", "nf4", "ids"]
ElementDtype = Literal["float32", "bfloat16", "float16", "int64"]


@dataclass(frozen=True)
class Tolerance:
    max_rel_diff: float


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(2e-3),
    "bf16": Tolerance(4e-2),
    "int8": Tolerance(0.12),
    "nf4": Tolerance(0.1),
    "ids": Tolerance(0.0),  # per call: one flipped token per IDS_TOKENS_PER_FLIP tokens
}
# Greedy sampling on other hardware can flip a near-tie between the two top tokens; the replay is
# teacher-forced, so a flip stays one token. A call may differ in one token per 16; a stage that
# changes more (a --byzantine one changes every token) is caught; calls under 16 tokens must match.
IDS_TOKENS_PER_FLIP = 16


def decode_output(data: bytes, element_dtype: str) -> np.ndarray:
    """Raw little-endian output bytes as a float64 (or int64) vector."""
    if element_dtype == "float32":
        return np.frombuffer(data, dtype="<f4").astype(np.float64)
    if element_dtype == "float16":
        return np.frombuffer(data, dtype="<f2").astype(np.float64)
    if element_dtype == "bfloat16":
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    if element_dtype == "int64":
        return np.frombuffer(data, dtype="<i8")
    raise ValueError(f"unknown element dtype {element_dtype!r}")


@dataclass(frozen=True)
class Comparison:
    max_abs_diff: float
    scale: float  # the L2 norm of the worst token's output
    rel_diff: float  # worst token's ||a - b|| / scale; inf when shapes or dtypes differ or values are not finite
    tolerance: float

    @property
    def within(self) -> bool:
        return self.rel_diff <= self.tolerance


def compare_outputs(a: np.ndarray, b: np.ndarray, shard_dtype: str, row_width: int = 0) -> Comparison:
    """Compare two outputs of the same stage call under the tolerance of ``shard_dtype``.

    The outputs are rows of ``row_width`` values (one token's hidden state; 0, or a width that
    does not divide the size: one row) and the difference is the worst token's relative L2 error
    ``max_t ||a_t - b_t|| / max(||a_t||, ||b_t||)``.
    """
    tol = TOLERANCES.get(shard_dtype)
    if tol is None:
        raise ValueError(f"no tolerance for shard dtype {shard_dtype!r}; known: {', '.join(TOLERANCES)}")
    if a.shape != b.shape:
        return Comparison(float("inf"), 0.0, float("inf"), tol.max_rel_diff)
    if a.size == 0:
        return Comparison(0.0, 0.0, 0.0, tol.max_rel_diff)
    if shard_dtype == "ids":  # share of sampled tokens that differ; see IDS_FLIPS_PER_TOKEN
        mismatched = int(np.count_nonzero(a != b))
        return Comparison(
            float(mismatched), float(a.size), mismatched / a.size, (a.size // IDS_TOKENS_PER_FLIP) / a.size
        )
    af, bf = a.astype(np.float64), b.astype(np.float64)
    if not (np.all(np.isfinite(af)) and np.all(np.isfinite(bf))):
        same = bool(np.array_equal(af, bf, equal_nan=True))
        return Comparison(0.0 if same else float("inf"), 0.0, 0.0 if same else float("inf"), tol.max_rel_diff)
    width = row_width if row_width > 0 and af.size % row_width == 0 else af.size
    ar, br = af.reshape(-1, width), bf.reshape(-1, width)
    norms = np.maximum(np.maximum(np.linalg.norm(ar, axis=1), np.linalg.norm(br, axis=1)), 1e-6)
    per_row = np.linalg.norm(ar - br, axis=1) / norms
    worst = int(np.argmax(per_row))
    diff = float(np.max(np.abs(af - bf)))
    return Comparison(diff, float(norms[worst]), float(per_row[worst]), tol.max_rel_diff)
