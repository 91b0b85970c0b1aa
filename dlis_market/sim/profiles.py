"""Measured figures the simulator starts from: device classes, batching slowdown, settlement gas.

Every number says where it comes from. *Measured* ones were taken on this project's code;
*assumed* ones have no measurement behind them yet and are the first to calibrate (see
``dlis sim --help``).

Device classes (decode time of one token through one SmolLM2-135M layer, one session alone):

* ``laptop`` 1.47 ms/layer, *measured*: the in-process 3-stage bf16 pipeline runs 1.19x HF's 19.0
  tok/s on 2 CPU threads (README "Measurements", ``bench/pipeline_local.py``): 22.6 tok/s over
  30 layers. Its link: 10 ms one way, 20 Mbit/s up (assumed home broadband; loopback measured
  0.4 ms per hop).
* ``phone`` 4.4 ms/layer (assumed 3x the laptop: mobile SoC, thermal limits), 30 ms, 10 Mbit/s.
* ``iot`` 8.8 ms/layer (assumed 6x: Raspberry-Pi class), 15 ms, 10 Mbit/s.
* ``server`` 0.3 ms/layer (assumed: a GPU server; the H100 runs of ``bench/gpu_tolerance.py``
  measured tolerances, not speed), 5 ms, 1 Gbit/s.

Prefill runs the prompt in one pass: per prompt token and layer it costs ``prefill_ratio`` of a
decode step (assumed 0.1; batched matmuls amortise the weight reads decode pays per token).

``make demo``'s four workers as they measured themselves while serving, with loopback links and
the broker's per-job costs, are the ``demo_calibrated`` scenario, which ``bench/sim_calibration.py``
writes (per peer group ``profile:`` figures over these classes).

Churn: hazard per 60 s heartbeat slot and mean outage in slots are the ones the oracle's dropout
model was fitted on (:func:`dlis_market.oracle.dropout.simulate_traces`: servers 1/5000 and 30,
laptops 1/400 and 120, phones 1/150 and 20); ``iot`` (1/300, 60) is assumed between them.

Prices per token and layer are ``make demo``'s (``scripts/demo.sh``: phone 1e12, laptop 2e12 and
server 3e12 token units per token for 10 layers); ``iot`` is assumed at half the phone's. The
operator's cost per token and layer (energy, hardware wear) is assumed at 40 % of the price.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dlis_market.types import LayerRange


class DeviceProfile(BaseModel):
    """One class of worker hardware, as the simulator draws peers from it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    compute_ms_per_layer: float = Field(gt=0)  # decode one token through one layer, one session
    # what the worker announces (its profiler's figure at start, broker/planning.py routes on it);
    # None: the same as compute_ms_per_layer
    advertised_ms_per_layer: float | None = Field(default=None, gt=0)
    link_latency_ms: float = Field(ge=0)  # one way, to reach this peer
    bandwidth_bytes_per_s: float = Field(gt=0)
    max_sessions: int = Field(ge=1)  # free KV slots when idle
    threads: int = Field(default=1, ge=1)  # CPU threads one forward pass keeps busy (a shared host's share)
    memory_bytes: int = Field(ge=0)  # free for KV cache (the scheduler's memory check)
    hazard_per_slot: float = Field(ge=0, le=1)  # probability of going offline per heartbeat slot
    mean_down_slots: float = Field(gt=0)  # mean outage length, in heartbeat slots
    price_per_token_layer: int = Field(ge=0)  # token units the peer asks per token per layer
    cost_per_token_layer: int = Field(ge=0)  # token units the peer spends per token per layer
    layouts: tuple[LayerRange, ...] = ()  # spans peers of this class serve when generated
    source: str = ""

    @field_validator("layouts", mode="before")
    @classmethod
    def _range_text(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple(LayerRange.parse(v) if isinstance(v, str) else v for v in value)
        return value


def _spans(*pairs: tuple[int, int]) -> tuple[LayerRange, ...]:
    return tuple(LayerRange(start=a, end=b) for a, b in pairs)


_THIRDS = _spans((0, 10), (10, 20), (20, 30))

DEVICES: dict[str, DeviceProfile] = {
    "laptop": DeviceProfile(
        compute_ms_per_layer=1.47,
        link_latency_ms=10.0,
        bandwidth_bytes_per_s=2.5e6,
        max_sessions=8,
        memory_bytes=8 << 30,
        hazard_per_slot=1 / 400,
        mean_down_slots=120,
        price_per_token_layer=2 * 10**11,
        cost_per_token_layer=8 * 10**10,
        layouts=_THIRDS,
        source="measured: bench/pipeline_local.py bf16 3 stages, 2 threads (README)",
    ),
    "phone": DeviceProfile(
        compute_ms_per_layer=4.4,
        link_latency_ms=30.0,
        bandwidth_bytes_per_s=1.25e6,
        max_sessions=2,
        memory_bytes=2 << 30,
        hazard_per_slot=1 / 150,
        mean_down_slots=20,
        price_per_token_layer=10**11,
        cost_per_token_layer=4 * 10**10,
        layouts=_THIRDS,
        source="assumed: 3x the laptop",
    ),
    "iot": DeviceProfile(
        compute_ms_per_layer=8.8,
        link_latency_ms=15.0,
        bandwidth_bytes_per_s=1.25e6,
        max_sessions=1,
        memory_bytes=1 << 30,
        hazard_per_slot=1 / 300,
        mean_down_slots=60,
        price_per_token_layer=5 * 10**10,
        cost_per_token_layer=2 * 10**10,
        layouts=_spans((0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30)),
        source="assumed: 6x the laptop",
    ),
    "server": DeviceProfile(
        compute_ms_per_layer=0.3,
        link_latency_ms=5.0,
        bandwidth_bytes_per_s=1.25e8,
        max_sessions=16,
        memory_bytes=64 << 30,
        hazard_per_slot=1 / 5000,
        mean_down_slots=30,
        price_per_token_layer=3 * 10**11,
        cost_per_token_layer=12 * 10**10,
        layouts=_spans((0, 15), (15, 30)),
        source="assumed: GPU server",
    ),
}

PREFILL_RATIO = 0.1  # assumed: prefill cost per prompt token and layer, relative to one decode step

# Aggregate throughput of one worker with n concurrent sessions, relative to one session alone:
# bench/pipeline_p2p.py (README), 3 SmolLM2 bf16 workers: 14.5 / 29.3 / 32.7 tok/s at 1 / 4 / 8
# sessions. Linear between the points, flat beyond the last (the stage batches at most 16).
_BATCH_SESSIONS = (1, 4, 8)
_BATCH_GAIN = (1.0, 29.3 / 14.5, 32.7 / 14.5)


def slowdown(sessions: int) -> float:
    """How much slower each of ``sessions`` concurrent sessions on one worker decodes than one alone."""
    if sessions <= 1:
        return 1.0
    i = bisect.bisect_left(_BATCH_SESSIONS, sessions)
    if i >= len(_BATCH_SESSIONS):
        gain = _BATCH_GAIN[-1]
    else:
        s0, s1 = _BATCH_SESSIONS[i - 1], _BATCH_SESSIONS[i]
        g0, g1 = _BATCH_GAIN[i - 1], _BATCH_GAIN[i]
        gain = g0 + (g1 - g0) * (sessions - s0) / (s1 - s0)
    return sessions / gain


def slowdowns(sessions: np.ndarray) -> np.ndarray:
    """:func:`slowdown` of every entry of ``sessions`` (vectorised, same figures)."""
    n = np.maximum(sessions, 1).astype(np.float64)
    return n / np.interp(n, _BATCH_SESSIONS, _BATCH_GAIN)


# One forward pass of a stage over b sessions at once, relative to one session alone (the
# "batched" stage model, see :mod:`.passes`): the worker merges queued steps of the same token
# count into one pass (node/sessions.py plan_batches). Measured on the real Stage
# (bench/sim_calibration.py batch_costs: SmolLM2-135M layers [10, 20) bf16, 1 thread, prompt 32;
# medians, load average 0.9): decode steps of 1 / 2 / 3 / 4 / 8 sessions cost 1 / 1.05 / 1.11 /
# 1.18 / 1.40 of one; prefills of 1 / 2 / 3 / 4 / 8 prompts 1 / 1.51 / 2.03 / 2.52 / 4.47 of one.
# Linear between the points and beyond the last two.
BATCH_DECODE_COST = {1: 1.0, 2: 1.047, 3: 1.113, 4: 1.177, 8: 1.400}
BATCH_PREFILL_COST = {1: 1.0, 2: 1.509, 3: 2.027, 4: 2.520, 8: 4.467}


def batch_cost(curve: dict[int, float], sessions: int) -> float:
    """A pass over ``sessions`` sessions relative to one alone, on a measured ``curve``."""
    xs = sorted(curve)
    if sessions <= xs[0] or len(xs) == 1:
        return curve[xs[0]]
    i = min(bisect.bisect_left(xs, sessions), len(xs) - 1)
    x0, x1 = xs[i - 1], xs[i]
    return curve[x0] + (curve[x1] - curve[x0]) * (sessions - x0) / (x1 - x0)


# Settlement gas, bench/gas_report.py on the real contracts (README), on the paths the broker takes:
# a job alone goes through settleJob (119,927 gas); a batch through settleBatchMerkle, 32,440 gas
# per job in a batch of 10 and 22,502 in a batch of 50, fitted as fixed + per job (exact at 10 and
# 50; predicts 144,247 for a Merkle batch of one, measured 142,032: within 1.6 %).
GAS_ALONE = 119_927
GAS_PER_JOB_IN_BATCH = (50 * 22_502 - 10 * 32_440) // 40
GAS_PER_BATCH = 10 * 32_440 - 10 * GAS_PER_JOB_IN_BATCH
GAS_REFERENCE_STAGES = 3  # the measured jobs had 3 receipts


def batch_gas(jobs: int) -> int:
    """Gas of settling ``jobs`` 3-stage jobs in one transaction (0 for an empty batch)."""
    if jobs <= 0:
        return 0
    return GAS_ALONE if jobs == 1 else GAS_PER_BATCH + GAS_PER_JOB_IN_BATCH * jobs
