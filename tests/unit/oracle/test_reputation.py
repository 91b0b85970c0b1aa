"""Reputation is a pure function with documented weights; summaries come from accepted reports."""

from __future__ import annotations

import pytest

from dlis_market.oracle.reputation import (
    NodeEpochStats,
    ReputationWeights,
    components,
    score_reputation,
    summarize_epoch,
)
from dlis_market.oracle.telemetry import JobOutcome

from .conftest import NOW

GOOD = NodeEpochStats(
    node="a",
    uptime_fraction=1.0,
    advertised_tps=100,
    measured_tps=100,
    latency_p50_ms=0.0,
    sessions_ok=10_000,
    checks_passed=10_000,
    stake=300,
    min_stake=100,
)


def test_perfect_node_near_max_and_silent_node_low() -> None:
    scores = score_reputation({"a": GOOD, "b": NodeEpochStats(node="b")})
    assert scores["a"] >= 9_990
    # no data: uptime 0, throughput 0, neutral latency/sessions/verification, no stake
    assert scores["b"] == round(10_000 * (0.15 * 0.5 + 0.15 * 0.5 + 0.15 * 0.5))


def test_each_component_moves_the_score_by_its_weight() -> None:
    w = ReputationWeights()
    base = score_reputation({"a": GOOD})["a"]
    half_up = score_reputation({"a": NodeEpochStats(**{**GOOD.__dict__, "uptime_fraction": 0.5})})["a"]
    assert base - half_up == pytest.approx(10_000 * w.uptime * 0.5, abs=2)
    overclaim = NodeEpochStats(**{**GOOD.__dict__, "advertised_tps": 200})
    assert components(overclaim, w)["throughput"] == 0.5
    below_min = NodeEpochStats(**{**GOOD.__dict__, "stake": 99})
    assert components(below_min, w)["stake"] == 0.0


def test_failed_check_halves_score() -> None:
    bad = NodeEpochStats(**{**GOOD.__dict__, "checks_failed": 1})
    assert score_reputation({"a": bad})["a"] == pytest.approx(score_reputation({"a": GOOD})["a"] / 2, abs=2)


def test_weights_must_sum_to_one() -> None:
    with pytest.raises(ValueError):
        ReputationWeights(uptime=0.5)


def test_summarize_epoch(make_report) -> None:
    start = NOW - 600
    reports = [
        make_report(seq=1, timestamp=start + 5, latencies_ms=(10.0, 30.0), sessions_ok=2),
        make_report(
            seq=2,
            timestamp=start + 65,
            measured_tps=35.0,
            sessions_failed=1,
            jobs=(JobOutcome(job_id="0x" + "00" * 32, ok=False, latency_ms=20.0, tokens=3),),
        ),
        make_report(seq=3, timestamp=start + 70),  # same slot as seq 2
        make_report(seq=4, timestamp=start + 600),  # next epoch
    ]
    node = reports[0].report.node
    stats = summarize_epoch(
        reports, start, 600, 60, checks={node: (3, 0), "0xsilent": (0, 1)}, stakes={node: (200, 100)}
    )
    s = stats[node]
    assert s.uptime_fraction == pytest.approx(2 / 10)
    assert s.measured_tps == pytest.approx((45 + 35 + 45) / 3)
    assert s.latency_p50_ms == 20.0
    assert (s.sessions_ok, s.sessions_failed) == (2, 2)
    assert (s.checks_passed, s.stake) == (3, 200)
    assert stats["0xsilent"].checks_failed == 1
