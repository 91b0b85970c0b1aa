"""Differential privacy of the published network figures: Laplace mechanism and a per-node budget.

Neighbouring datasets differ in *one node's* telemetry for the epoch (replace-one; the set of
nodes scored in an epoch is public anyway: it is posted on chain). Every published figure is a
sum over nodes of a per-node contribution clipped to a known range, so its L1 sensitivity is the
width of that range:

=================  ===================================================  ===========
figure             per-node contribution                                sensitivity
=================  ===================================================  ===========
availability       uptime fraction in [0, 1]                            1
latency histogram  the node's own latency histogram, normalized to 1    2
capacity           measured tokens/s clipped to ``capacity_clip_tps``   clip
=================  ===================================================  ===========

Noise is Laplace with scale ``sensitivity / epsilon_figure``; an epoch's ``epsilon`` is split
evenly over the three figures, so releasing one epoch costs each included node ``epsilon``
(basic sequential composition). :class:`BudgetAccountant` keeps, per node, what was spent in
the current window of ``window_epochs`` epochs; a node whose remaining budget is below an
epoch's cost is left out of that epoch's figures (its data is not used at all) and
:meth:`BudgetAccountant.charge` refuses outright to overspend. Divisions by the node count,
clipping to valid ranges and quantiles read off the noisy histogram are post-processing and cost
nothing. Raw per-node telemetry is never published; only these noisy figures are.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlis_market.oracle.errors import PrivacyBudgetExhaustedError
from dlis_market.types import WireModel

LATENCY_EDGES_MS: tuple[float, ...] = (0.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0)  # last: +inf
FIGURES = ("availability", "latency_histogram", "capacity")


@dataclass(frozen=True)
class LaplaceMechanism:
    """Adds Laplace(0, sensitivity/epsilon) noise: epsilon-DP for an L1-``sensitivity`` query."""

    sensitivity: float
    epsilon: float

    def __post_init__(self) -> None:
        if self.sensitivity <= 0 or self.epsilon <= 0:
            raise ValueError(f"sensitivity and epsilon must be positive, got {self.sensitivity}, {self.epsilon}")

    @property
    def scale(self) -> float:
        return self.sensitivity / self.epsilon

    def release(self, value: float | np.ndarray, rng: np.random.Generator) -> np.ndarray:
        true = np.asarray(value, dtype=np.float64)
        return true + rng.laplace(0.0, self.scale, size=true.shape)


@dataclass
class BudgetAccountant:
    """Per-node privacy spend (basic composition) within windows of ``window_epochs`` epochs."""

    budget: float
    window_epochs: int
    spent: dict[str, float] = field(default_factory=dict)
    window: int = 0  # index of the current window: epoch // window_epochs
    releases: list[dict[str, Any]] = field(default_factory=list)  # (epoch, figure, epsilon, nodes)

    def _roll(self, epoch: int) -> None:
        w = epoch // self.window_epochs
        if w != self.window:
            self.window, self.spent = w, {}

    def remaining(self, node: str, epoch: int) -> float:
        self._roll(epoch)
        return self.budget - self.spent.get(node, 0.0)

    def affordable(self, nodes: Iterable[str], epsilon: float, epoch: int) -> list[str]:
        return [n for n in nodes if self.remaining(n, epoch) >= epsilon - 1e-12]

    def charge(self, nodes: Sequence[str], epsilon: float, epoch: int, figure: str) -> None:
        """Record that ``figure`` used these nodes' data at ``epsilon``; refuse before overspending."""
        short = [n for n in nodes if self.remaining(n, epoch) < epsilon - 1e-12]
        if short:
            raise PrivacyBudgetExhaustedError(
                f"{len(short)} node(s) (first {short[0]}) have less than epsilon={epsilon} of their "
                f"{self.budget} budget left in window {self.window}; leave them out of {figure}"
            )
        for n in nodes:
            self.spent[n] = self.spent.get(n, 0.0) + epsilon
        self.releases.append({"epoch": epoch, "figure": figure, "epsilon": epsilon, "nodes": len(nodes)})

    def account(self, node: str, epoch: int) -> dict[str, Any]:
        """The documented budget account of one node (what ``GET /v1/privacy/{node}`` shows)."""
        remaining = self.remaining(node, epoch)
        return {
            "node": node,
            "budget": self.budget,
            "window": self.window,
            "window_epochs": self.window_epochs,
            "spent": self.budget - remaining,
            "remaining": remaining,
        }

    def to_json(self) -> str:
        return json.dumps(
            {
                "budget": self.budget,
                "window_epochs": self.window_epochs,
                "spent": self.spent,
                "window": self.window,
                "releases": self.releases[-1000:],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> BudgetAccountant:
        d = json.loads(text)
        return cls(float(d["budget"]), int(d["window_epochs"]), dict(d["spent"]), int(d["window"]), list(d["releases"]))


class NodeContribution(WireModel):
    """One node's inputs to the published figures (never published itself)."""

    uptime_fraction: float
    measured_tps: float
    latencies_ms: tuple[float, ...]


class Aggregates(WireModel):
    """The noisy network figures of one epoch (``GET /v1/aggregates``)."""

    epoch: int
    nodes: int  # nodes whose data was used (public: they are scored on chain)
    excluded_nodes: int  # left out because their privacy budget is spent
    epsilon: float  # per node for this epoch, split evenly over the figures
    noise_scale: dict[str, float]  # Laplace scale b of each figure
    availability: float | None  # mean uptime fraction
    latency_edges_ms: tuple[float, ...]
    latency_fractions: tuple[float, ...]  # per bucket [edge_i, edge_i+1), last bucket open
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p99_ms: float | None
    capacity_tps: float | None  # sum of measured throughput (each node clipped)


def node_histogram(latencies_ms: Sequence[float]) -> np.ndarray:
    """A node's latency histogram over :data:`LATENCY_EDGES_MS`, normalized to sum 1 (0 if none)."""
    counts = np.zeros(len(LATENCY_EDGES_MS))
    if latencies_ms:
        idx = np.searchsorted(np.asarray(LATENCY_EDGES_MS), np.asarray(latencies_ms, dtype=np.float64), "right") - 1
        np.add.at(counts, np.clip(idx, 0, len(LATENCY_EDGES_MS) - 1), 1.0)
        counts /= counts.sum()
    return counts


def _quantile(fractions: np.ndarray, q: float) -> float | None:
    if fractions.sum() <= 0:
        return None
    cdf = np.cumsum(fractions) / fractions.sum()
    i = int(np.searchsorted(cdf, q))
    i = min(i, len(LATENCY_EDGES_MS) - 1)
    lo = LATENCY_EDGES_MS[i]
    hi = LATENCY_EDGES_MS[i + 1] if i + 1 < len(LATENCY_EDGES_MS) else lo * 2
    before = cdf[i - 1] if i > 0 else 0.0
    width = cdf[i] - before
    return float(lo + (hi - lo) * ((q - before) / width if width > 0 else 0.5))


def release_aggregates(
    epoch: int,
    contributions: Mapping[str, NodeContribution],
    epsilon: float,
    capacity_clip_tps: float,
    accountant: BudgetAccountant,
    rng: np.random.Generator,
) -> Aggregates:
    """Noisy availability, latency distribution and capacity of ``epoch``; charges the budget."""
    eps_fig = epsilon / len(FIGURES)
    used = sorted(accountant.affordable(contributions, epsilon, epoch))
    mech = {
        "availability": LaplaceMechanism(1.0, eps_fig),
        "latency_histogram": LaplaceMechanism(2.0, eps_fig),
        "capacity": LaplaceMechanism(capacity_clip_tps, eps_fig),
    }
    scales = {name: m.scale for name, m in mech.items()}
    excluded = len(contributions) - len(used)
    if not used:
        empty = (0.0,) * len(LATENCY_EDGES_MS)
        return Aggregates(
            epoch=epoch,
            nodes=0,
            excluded_nodes=excluded,
            epsilon=epsilon,
            noise_scale=scales,
            availability=None,
            latency_edges_ms=LATENCY_EDGES_MS,
            latency_fractions=empty,
            latency_p50_ms=None,
            latency_p90_ms=None,
            latency_p99_ms=None,
            capacity_tps=None,
        )
    for name in FIGURES:
        accountant.charge(used, eps_fig, epoch, name)
    rows = [contributions[n] for n in used]
    up = sum(min(max(c.uptime_fraction, 0.0), 1.0) for c in rows)
    hist = np.sum([node_histogram(c.latencies_ms) for c in rows], axis=0)
    cap = sum(min(max(c.measured_tps, 0.0), capacity_clip_tps) for c in rows)
    n = len(used)
    availability = float(np.clip(mech["availability"].release(up, rng) / n, 0.0, 1.0))
    noisy_hist = np.clip(mech["latency_histogram"].release(hist, rng), 0.0, None)
    fractions = noisy_hist / noisy_hist.sum() if noisy_hist.sum() > 0 else noisy_hist
    capacity = float(np.maximum(mech["capacity"].release(cap, rng), 0.0))
    return Aggregates(
        epoch=epoch,
        nodes=n,
        excluded_nodes=excluded,
        epsilon=epsilon,
        noise_scale=scales,
        availability=availability,
        latency_edges_ms=LATENCY_EDGES_MS,
        latency_fractions=tuple(float(x) for x in fractions),
        latency_p50_ms=_quantile(fractions, 0.5),
        latency_p90_ms=_quantile(fractions, 0.9),
        latency_p99_ms=_quantile(fractions, 0.99),
        capacity_tps=capacity,
    )
