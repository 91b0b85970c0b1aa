"""Reputation: a pure function from one epoch's per-node statistics to scores in basis points.

``score = penalty ** checks_failed * sum(weight_i * component_i)`` with every component in
``[0, 1]`` and the weights summing to 1 (defaults in :class:`ReputationWeights`):

============  ======  ==========================================================================
component     weight  definition
============  ======  ==========================================================================
uptime        0.30    heartbeat slots of the epoch in which a report *arrived* / slots in epoch
throughput    0.20    ``min(1, observed_tps / advertised_tps)``: over-advertising is punished
latency       0.15    ``ref / (ref + p50 observed ms per token)``, ``ref = 100 ms``
sessions      0.15    ``(ok + 1) / (ok + failed + 2)`` of observed jobs: Beta(1, 1) prior
verification  0.15    ``(passed + 1) / (passed + failed + 2)`` over this epoch's spot checks
stake         0.05    ``min(1, stake / (2 * min_stake))``; 0 below the minimum stake
============  ======  ==========================================================================

Earned, not declared: throughput, latency and sessions come from what the broker observed and
signed (:mod:`observations`), never from the node's telemetry; a node nobody observed gets the
neutral 0.5 for each, whatever it claims. Uptime counts the slots in which the oracle *received* a
report (its own clock), so reports signed later with earlier timestamps fill no missed slot.
``advertised_tps`` is the larger of the node's claims (telemetry, and the record the broker
routed on), so a low claim in telemetry does not excuse a high one on the DHT.

Uptime carries most weight because a dropped stage costs a whole session a failover; a proven
spot-check mismatch also halves the score (``penalty = 0.5`` per failed check) on top of the
slash, because the verification component alone could be outweighed by good uptime.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from web3 import Web3

from dlis_market.oracle.telemetry import ReceivedTelemetry
from dlis_market.protocol.observations import StageObservation

MAX_BPS = 10_000


@dataclass(frozen=True)
class ReputationWeights:
    uptime: float = 0.30
    throughput: float = 0.20
    latency: float = 0.15
    sessions: float = 0.15
    verification: float = 0.15
    stake: float = 0.05
    latency_ref_ms: float = 100.0
    stake_saturation: float = 2.0  # stake at this multiple of the minimum scores full marks
    failed_check_penalty: float = 0.5

    def __post_init__(self) -> None:
        total = self.uptime + self.throughput + self.latency + self.sessions + self.verification + self.stake
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"reputation weights must sum to 1, got {total}")


@dataclass(frozen=True)
class NodeEpochStats:
    """What the oracle knows about one node for one epoch (input of :func:`score_reputation`).

    ``measured_tps``, ``latency_p50_ms`` and the session counts are the broker's observations
    (``None`` / 0 when unobserved); ``reported_tps`` is the node's own figure, used only for the
    noisy network capacity (:mod:`privacy`), never for its score."""

    node: str
    uptime_fraction: float = 0.0
    advertised_tps: float = 0.0
    measured_tps: float | None = None
    latency_p50_ms: float | None = None
    sessions_ok: int = 0
    sessions_failed: int = 0
    checks_passed: int = 0
    checks_failed: int = 0
    stake: int = 0
    min_stake: int = 0
    reported_tps: float = 0.0


def components(s: NodeEpochStats, w: ReputationWeights) -> dict[str, float]:
    """Each component of a node's score in ``[0, 1]`` (shown by the CLI and in tests)."""
    if s.measured_tps is None:
        thr = 0.5  # unobserved: neutral, whatever the node says about itself
    else:
        thr = min(1.0, s.measured_tps / s.advertised_tps) if s.advertised_tps > 0 else 0.0
    lat = 0.5 if s.latency_p50_ms is None else w.latency_ref_ms / (w.latency_ref_ms + max(s.latency_p50_ms, 0.0))
    if s.min_stake > 0:
        stake = 0.0 if s.stake < s.min_stake else min(1.0, s.stake / (w.stake_saturation * s.min_stake))
    else:
        stake = 1.0 if s.stake > 0 else 0.0
    return {
        "uptime": min(max(s.uptime_fraction, 0.0), 1.0),
        "throughput": max(thr, 0.0),
        "latency": lat,
        "sessions": (s.sessions_ok + 1) / (s.sessions_ok + s.sessions_failed + 2),
        "verification": (s.checks_passed + 1) / (s.checks_passed + s.checks_failed + 2),
        "stake": stake,
    }


def score_node(s: NodeEpochStats, w: ReputationWeights) -> int:
    c = components(s, w)
    raw = sum(getattr(w, name) * value for name, value in c.items())
    raw *= w.failed_check_penalty**s.checks_failed
    return max(0, min(MAX_BPS, round(raw * MAX_BPS)))


def score_reputation(history: Mapping[str, NodeEpochStats], weights: ReputationWeights | None = None) -> dict[str, int]:
    """Scores in basis points (0..10000) for every node in ``history``. Pure."""
    w = weights or ReputationWeights()
    return {node: score_node(stats, w) for node, stats in sorted(history.items())}


def summarize_epoch(
    reports: Sequence[ReceivedTelemetry],
    epoch_start: float,
    epoch_s: float,
    heartbeat_interval_s: float,
    checks: Mapping[str, tuple[int, int]] | None = None,
    stakes: Mapping[str, tuple[int, int]] | None = None,
    observations: Sequence[StageObservation] = (),
) -> dict[str, NodeEpochStats]:
    """Per-node statistics of the epoch ``[epoch_start, epoch_start + epoch_s)`` of the oracle's clock.

    ``reports`` are accepted reports with their arrival times (others than the epoch's are
    ignored); ``observations`` the broker's signed observations recorded in the epoch;
    ``checks[node] = (passed, failed)`` spot checks; ``stakes[node] = (active stake, min stake)``.
    Pure.
    """
    checks = checks or {}
    stakes = stakes or {}
    slots_total = max(1, int(epoch_s // heartbeat_interval_s))
    by_node: dict[str, list[ReceivedTelemetry]] = defaultdict(list)
    for r in reports:
        if epoch_start <= r.received_at < epoch_start + epoch_s:
            by_node[r.telemetry.report.node].append(r)
    seen: dict[str, list[StageObservation]] = defaultdict(list)
    for o in observations:
        seen[Web3.to_checksum_address(o.node)].append(o)
    out: dict[str, NodeEpochStats] = {}
    for node in sorted(set(by_node) | set(seen) | set(checks)):
        rs, obs = by_node.get(node, []), seen.get(node, [])
        slots = {int((r.received_at - epoch_start) // heartbeat_interval_s) for r in rs}
        claimed = [r.telemetry.report.metrics for r in rs]
        tokens = sum(o.tokens for o in obs if o.ok)
        busy_s = sum(o.latency_ms for o in obs if o.ok) / 1000.0
        per_token = [t for o in obs if o.ok and (t := o.ms_per_token) is not None]
        advertised = max([m.advertised_tps for m in claimed] + [o.routed_tps for o in obs], default=0.0)
        passed, flunked = checks.get(node, (0, 0))
        stake, min_stake = stakes.get(node, (0, 0))
        out[node] = NodeEpochStats(
            node=node,
            uptime_fraction=min(1.0, len(slots) / slots_total),
            advertised_tps=advertised,
            measured_tps=tokens / busy_s if busy_s > 0 else None,
            latency_p50_ms=statistics.median(per_token) if per_token else None,
            sessions_ok=sum(1 for o in obs if o.ok),
            sessions_failed=sum(1 for o in obs if not o.ok),
            checks_passed=passed,
            checks_failed=flunked,
            stake=stake,
            min_stake=min_stake,
            reported_tps=statistics.fmean(m.measured_tps for m in claimed) if claimed else 0.0,
        )
    return out
