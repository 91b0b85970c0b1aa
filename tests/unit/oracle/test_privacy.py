"""The Laplace mechanism's noise has the right scale; the per-node budget is enforced."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dlis_market.oracle.errors import PrivacyBudgetExhaustedError
from dlis_market.oracle.privacy import (
    BudgetAccountant,
    LaplaceMechanism,
    NodeContribution,
    node_histogram,
    release_aggregates,
)


@pytest.mark.parametrize(("sensitivity", "epsilon"), [(1.0, 0.5), (2.0, 1 / 3), (1000.0, 1.0)])
def test_noise_is_laplace_with_scale_sensitivity_over_epsilon(sensitivity: float, epsilon: float) -> None:
    mech = LaplaceMechanism(sensitivity, epsilon)
    b = sensitivity / epsilon
    noise = mech.release(np.zeros(20_000), np.random.default_rng(7))
    # mean absolute deviation of Laplace(0, b) is b; the std of the estimate is b / sqrt(n) = 0.7 % of b
    assert abs(np.mean(np.abs(noise)) - b) < 0.03 * b
    assert abs(np.mean(noise)) < 0.05 * b
    # and the whole distribution matches (a wrong scale by 10 % fails this at n = 20000)
    assert stats.kstest(noise, stats.laplace(0, b).cdf).pvalue > 0.01
    assert stats.kstest(noise, stats.laplace(0, 1.1 * b).cdf).pvalue < 1e-6
    assert stats.kstest(noise, stats.laplace(0, 0.9 * b).cdf).pvalue < 1e-6


def test_mechanism_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        LaplaceMechanism(1.0, 0.0)
    with pytest.raises(ValueError):
        LaplaceMechanism(-1.0, 1.0)


def test_budget_refuses_overspend_and_rolls_over() -> None:
    acc = BudgetAccountant(budget=2.0, window_epochs=10)
    acc.charge(["a", "b"], 1.5, epoch=0, figure="x")
    assert acc.remaining("a", 0) == pytest.approx(0.5)
    with pytest.raises(PrivacyBudgetExhaustedError, match="leave them out"):
        acc.charge(["a"], 1.0, epoch=1, figure="x")
    assert acc.spent["a"] == pytest.approx(1.5)  # nothing charged on refusal
    assert acc.affordable(["a", "c"], 1.0, epoch=1) == ["c"]
    assert acc.remaining("a", 10) == pytest.approx(2.0)  # new window
    assert BudgetAccountant.from_json(acc.to_json()).spent == acc.spent


def _contribs(n: int) -> dict[str, NodeContribution]:
    rng = np.random.default_rng(1)
    return {
        f"n{i}": NodeContribution(
            uptime_fraction=0.9,
            measured_tps=100.0,
            latencies_ms=tuple(float(x) for x in rng.uniform(20, 40, 10)),
        )
        for i in range(n)
    }


def test_aggregates_are_close_to_truth_with_many_nodes_and_spend_budget() -> None:
    acc = BudgetAccountant(budget=3.0, window_epochs=100)
    agg = release_aggregates(1, _contribs(200), 1.0, 1000.0, acc, np.random.default_rng(0))
    assert agg.nodes == 200 and agg.excluded_nodes == 0
    assert agg.noise_scale == {"availability": 3.0, "latency_histogram": 6.0, "capacity": 3000.0}
    assert agg.availability is not None and abs(agg.availability - 0.9) < 0.1
    assert agg.latency_p50_ms is not None and 25 <= agg.latency_p50_ms <= 50
    assert sum(agg.latency_fractions) == pytest.approx(1.0)
    assert acc.remaining("n0", 1) == pytest.approx(2.0)
    # spend the rest; the fourth epoch leaves every node out
    release_aggregates(2, _contribs(200), 1.0, 1000.0, acc, np.random.default_rng(0))
    release_aggregates(3, _contribs(200), 1.0, 1000.0, acc, np.random.default_rng(0))
    out = release_aggregates(4, _contribs(200), 1.0, 1000.0, acc, np.random.default_rng(0))
    assert out.nodes == 0 and out.excluded_nodes == 200 and out.availability is None


def test_node_histogram_normalized() -> None:
    h = node_histogram([5.0, 30.0, 30.0, 5000.0])
    assert h.sum() == pytest.approx(1.0)
    assert h[0] == pytest.approx(0.25) and h[2] == pytest.approx(0.5) and h[-1] == pytest.approx(0.25)
    assert node_histogram([]).sum() == 0


def test_published_capacity_noise_has_the_documented_scale() -> None:
    """End to end through release_aggregates: epsilon split in three, capacity sensitivity = clip."""
    contribs = _contribs(20)  # true capacity 20 * 100 = 2000 tps
    rng = np.random.default_rng(11)
    errors = []
    for epoch in range(2000):
        acc = BudgetAccountant(budget=10.0, window_epochs=1)
        agg = release_aggregates(epoch, contribs, 1.5, 200.0, acc, rng)
        assert agg.capacity_tps is not None
        errors.append(agg.capacity_tps - 2000.0)
    b = 200.0 / (1.5 / 3)  # 400: the clamp at 0 is 5 scales away (P = 0.3 %), negligible here
    assert stats.kstest(errors, stats.laplace(0, b).cdf).pvalue > 0.01
    assert abs(np.mean(np.abs(errors)) - b) < 0.07 * b  # 3 standard errors at n = 2000
