"""Per-node dropout risk for the scheduler's ``failure_risk`` term.

A node's history is its heartbeat record, one entry per heartbeat slot (``heartbeat_interval_s``):
1 when the oracle accepted a report in that slot, 0 when it missed one, oldest first. A node
*drops out* in the next window when an outage (at least :data:`OUTAGE_SLOTS` consecutive missed
heartbeats) begins within the next :data:`WINDOW_SLOTS` slots: a session routed there now would
have to fail over. The risk is the predicted probability of that, for a node present now.

Two simple models are compared on traces with :func:`evaluate` (``bench/dropout_model.py``):

- :class:`ExpSmoothingModel`: exponential smoothing of the node's own per-window dropout
  indicator (its recent dropout rate), started from the population base rate;
- :class:`LogisticModel`: logistic regression on features of the recent record (miss fraction
  over the last 3, 10 and 60 slots and a slow EWMA of misses, length of the current streak, past
  dropouts per day), which also sees *precursors* (intermittent misses before a dropout).

On the simulated traces of :func:`simulate_traces` (300 nodes, 3 days of 60 s slots, seed 0;
fit on 150 nodes, 53 286 prediction points; tested on the other 150 nodes, 53 406 points, dropout
rate 3.0 % per 10-slot window), ``bench/dropout_model.py`` measured:

===========================  ======  ============  =====
model                        Brier   Brier skill   AUC
===========================  ======  ============  =====
constant base rate           0.0293  0             0.500
exp smoothing (alpha 0.02)   0.0290  0.009         0.695
logistic regression          0.0279  0.045         0.718
===========================  ======  ============  =====

so the logistic model is the default: better calibrated (Brier) and better at ranking (AUC).
The gain over the base rate is modest because most simulated dropouts (laptops, servers) come
without warning; it comes from the precursor misses and from each node's own dropout rate. :data:`DEFAULT_MODEL` holds
its coefficients as fitted there; the oracle can refit on its own recorded history with
:func:`fit_logistic`. No real fleet traces were available, so the choice is provisional: rerun the
bench on recorded heartbeat records before relying on the calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

WINDOW_SLOTS = 10  # the prediction window, in heartbeat slots
OUTAGE_SLOTS = 5  # this many consecutive missed heartbeats is an outage (a dropout)
HISTORY_SLOTS = 1440  # features look back this far (one day at 60 s heartbeats)
FEATURES = ("miss_3", "miss_10", "miss_60", "miss_ewma", "log_streak", "dropouts_per_day", "bias")
_EWMA_WEIGHTS = 0.98 ** np.arange(HISTORY_SLOTS)[::-1]


def features(history: Sequence[int] | np.ndarray) -> np.ndarray:
    """Feature vector of a heartbeat record (1 = seen, 0 = missed), oldest first."""
    h = np.asarray(history[-HISTORY_SLOTS:], dtype=np.float64)
    if h.size == 0:
        return np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    miss = 1.0 - h
    miss_3 = float(miss[-3:].mean())
    miss_10 = float(miss[-10:].mean())
    miss_60 = float(miss[-60:].mean())
    weights = _EWMA_WEIGHTS[-h.size :]  # slow EWMA, ~50-slot memory
    miss_ewma = float((miss * weights).sum() / weights.sum())
    down = np.flatnonzero(miss)
    streak = h.size - (int(down[-1]) + 1) if down.size else h.size
    # past dropouts: runs of >= OUTAGE_SLOTS consecutive misses
    padded = np.concatenate(([0.0], miss, [0.0]))
    edges = np.diff(padded)
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    dropouts_per_day = float((runs >= OUTAGE_SLOTS).sum()) * HISTORY_SLOTS / h.size
    return np.array([miss_3, miss_10, miss_60, miss_ewma, float(np.log1p(streak)), dropouts_per_day, 1.0])


def dropped_out(future: Sequence[int] | np.ndarray) -> bool:
    """Whether an outage begins in the first :data:`WINDOW_SLOTS` slots of ``future``.

    ``future`` must cover ``WINDOW_SLOTS + OUTAGE_SLOTS - 1`` slots to tell an outage starting
    late in the window from a short blip.
    """
    miss = 1 - np.asarray(future[: WINDOW_SLOTS + OUTAGE_SLOTS - 1], dtype=np.int64)
    if miss.size < OUTAGE_SLOTS:
        return False
    run_sums = np.convolve(miss, np.ones(OUTAGE_SLOTS, dtype=np.int64), mode="valid")
    return bool(np.any(run_sums[:WINDOW_SLOTS] == OUTAGE_SLOTS))


def window_outages(history: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per past window (aligned to the end of ``history``): 1 if an outage began in it."""
    h = np.asarray(history, dtype=np.int64)
    miss = 1 - h
    n_windows = (h.size - OUTAGE_SLOTS + 1) // WINDOW_SLOTS
    if n_windows <= 0:
        return np.zeros(0)
    run_sums = np.convolve(miss, np.ones(OUTAGE_SLOTS, dtype=np.int64), mode="valid")  # run starting at i
    previous_missed = np.concatenate(([0], miss[: run_sums.size - 1]))
    starts = ((run_sums == OUTAGE_SLOTS) & (previous_missed == 0)).astype(np.int64)  # outage begins at i
    starts = starts[starts.size - n_windows * WINDOW_SLOTS :]
    return (starts.reshape(n_windows, WINDOW_SLOTS).max(axis=1)).astype(np.float64)


@dataclass(frozen=True)
class LogisticModel:
    coef: tuple[float, ...]  # one per FEATURES entry, "bias" last

    def predict(self, history: Sequence[int] | np.ndarray) -> float:
        z = float(np.dot(self.coef, features(history)))
        return float(1.0 / (1.0 + np.exp(-np.clip(z, -30, 30))))


@dataclass(frozen=True)
class ExpSmoothingModel:
    alpha: float  # smoothing per window
    prior: float  # population dropout rate per window (the starting level)

    def predict(self, history: Sequence[int] | np.ndarray) -> float:
        ind = window_outages(history[-HISTORY_SLOTS:])
        n = ind.size
        decay = (1 - self.alpha) ** np.arange(n)[::-1]
        return float(self.prior * (1 - self.alpha) ** n + self.alpha * np.dot(decay, ind))


DropoutModel = LogisticModel | ExpSmoothingModel

# Fitted by bench/dropout_model.py on simulate_traces(300, 4320, seed=0), training half.
DEFAULT_MODEL = LogisticModel(coef=(0.53, 0.219, -0.264, -0.17, -0.431, 0.084, -2.29))


# ------------------------------------------------------------------------------ evaluation


def samples(traces: np.ndarray, stride: int = WINDOW_SLOTS, warmup: int = 60) -> list[tuple[int, int]]:
    """``(node, t)`` prediction points: node present in slot t-1, its future fully observed."""
    out = []
    horizon = WINDOW_SLOTS + OUTAGE_SLOTS - 1
    for node in range(traces.shape[0]):
        for t in range(warmup, traces.shape[1] - horizon + 1, stride):
            if traces[node, t - 1]:
                out.append((node, t))
    return out


def dataset(traces: np.ndarray, stride: int = WINDOW_SLOTS) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    points = samples(traces, stride)
    x = np.array([features(traces[n, max(0, t - HISTORY_SLOTS) : t]) for n, t in points])
    y = np.array([float(dropped_out(traces[n, t:])) for n, t in points])
    return x, y, points


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> LogisticModel:
    """Maximum-likelihood logistic regression with a small L2 penalty (not on the bias)."""

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = np.clip(x @ w, -30, 30)
        p = 1.0 / (1.0 + np.exp(-z))
        eps = 1e-12
        nll = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))
        reg = l2 * float(np.sum(w[:-1] ** 2))
        grad = x.T @ (p - y) / len(y)
        grad[:-1] += 2 * l2 * w[:-1]
        return float(nll + reg), grad

    result = minimize(loss, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B")
    return LogisticModel(coef=tuple(float(c) for c in result.x))


def brier(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((p - y) ** 2))


def auc(p: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    from scipy.stats import rankdata

    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(model: DropoutModel, traces: np.ndarray, points: list[tuple[int, int]], y: np.ndarray) -> dict[str, float]:
    p = np.array([model.predict(traces[n, max(0, t - HISTORY_SLOTS) : t]) for n, t in points])
    return {"brier": brier(p, y), "auc": auc(p, y), "mean_p": float(p.mean()), "rate": float(y.mean())}


def simulate_traces(n_nodes: int, n_slots: int, seed: int) -> np.ndarray:
    """Synthetic heartbeat records of a mixed fleet (1 = heartbeat seen), ``[nodes, slots]``.

    Three kinds, a third each in expectation: *servers* (rare outages, no warning), *laptops*
    (sessions of a few hours ending without warning, then an hour or more away) and *phones*
    (frequent drops, 70 % preceded by 5-20 slots of intermittent misses: battery saver, thermal
    throttling, a weak link). Every node also loses 0.5 % of heartbeats at random.
    """
    rng = np.random.default_rng(seed)
    out = np.ones((n_nodes, n_slots), dtype=np.int8)
    kinds = rng.choice(3, size=n_nodes, p=[0.3, 0.4, 0.3])
    params = {0: (1 / 5000, 30), 1: (1 / 400, 120), 2: (1 / 150, 20)}  # hazard per slot, mean down slots
    for node in range(n_nodes):
        hazard, mean_down = params[int(kinds[node])]
        hazard *= rng.uniform(0.5, 2.0)  # nodes of a kind differ
        t = 0
        while t < n_slots:
            up_len = int(rng.geometric(hazard))
            end_up = min(n_slots, t + up_len)
            if kinds[node] == 2 and rng.random() < 0.7:  # precursor phase before the drop
                pre = int(rng.integers(5, 21))
                lo = max(t, end_up - pre)
                out[node, lo:end_up] = (rng.random(end_up - lo) > 0.4).astype(np.int8)
            down_len = int(rng.geometric(1 / mean_down))
            out[node, end_up : min(n_slots, end_up + down_len)] = 0
            t = end_up + down_len
        out[node] &= (rng.random(n_slots) > 0.005).astype(np.int8)
    return out
