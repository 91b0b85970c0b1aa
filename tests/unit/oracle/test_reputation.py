"""Reputation is a pure function with documented weights; summaries come from accepted reports."""

from __future__ import annotations

import pytest
from web3 import Web3

from dlis_market.oracle.reputation import (
    NodeEpochStats,
    ReputationWeights,
    components,
    score_reputation,
    summarize_epoch,
)
from dlis_market.oracle.telemetry import ReceivedTelemetry
from dlis_market.protocol.observations import StageObservation

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
    # no data: uptime 0, neutral (unobserved) throughput/latency/sessions/verification, no stake
    assert scores["b"] == round(10_000 * (0.20 * 0.5 + 0.15 * 0.5 + 0.15 * 0.5 + 0.15 * 0.5))


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


def _observed(node: str, job: int, tokens: int, latency_ms: int, ok: bool = True) -> StageObservation:
    return StageObservation(
        node=node, job_id=f"0x{job:064x}", start=0, end=8, tokens=tokens, latency_ms=latency_ms, routed_tps=60.0, ok=ok
    )


def test_summarize_epoch(make_report) -> None:
    start = NOW - 600
    reports = [
        ReceivedTelemetry(received_at=start + at, telemetry=make_report(seq=seq, timestamp=start + claimed, **kw))
        for seq, at, claimed, kw in [
            (1, 5, 5, {"latencies_ms": (10.0, 30.0), "sessions_ok": 2}),
            (2, 65, 65, {"measured_tps": 35.0, "sessions_failed": 1}),
            (3, 70, 10, {}),  # arrived in the same slot as seq 2, claiming slot 0: one slot
            (4, 75, -400, {}),  # claims an earlier epoch but arrived in this one: counted here
            (5, 600, 600, {}),  # next epoch
        ]
    ]
    node = reports[0].telemetry.report.node
    observations = [
        _observed(node, 1, 10, 1000),
        _observed(node, 2, 30, 1000),
        _observed(node, 3, 0, 0, ok=False),
        _observed("0x" + "cd" * 20, 4, 5, 50),  # another node, observed only
    ]
    stats = summarize_epoch(
        reports, start, 600, 60, checks={node: (3, 0), "0xsilent": (0, 1)}, stakes={node: (200, 100)},
        observations=observations,
    )  # fmt: skip
    s = stats[node]
    assert s.uptime_fraction == pytest.approx(2 / 10)
    assert s.measured_tps == pytest.approx(40 / 2.0)  # observed: tokens over the broker's seconds
    assert s.reported_tps == pytest.approx((45 + 35 + 45 + 45) / 4)  # claimed: for the DP figures only
    assert s.advertised_tps == 60.0  # the larger claim: the record the broker routed on
    assert s.latency_p50_ms == pytest.approx((100.0 + 1000 / 30) / 2)  # observed ms per token
    assert (s.sessions_ok, s.sessions_failed) == (2, 1)  # observed jobs; the claimed sessions count for nothing
    assert (s.checks_passed, s.stake) == (3, 200)
    assert stats["0xsilent"].checks_failed == 1
    other = stats[Web3.to_checksum_address("0x" + "cd" * 20)]
    assert (other.uptime_fraction, other.sessions_ok, other.measured_tps) == (0.0, 1, pytest.approx(100.0))
