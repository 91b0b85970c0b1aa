"""The calibrated demo scenario (bench/sim_calibration.py) and the model pieces it relies on:
closed-loop clients, the broker's fixed costs per job, and offers built from announced figures."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dlis_market.settings import Settings
from dlis_market.sim.engine import simulate
from dlis_market.sim.errors import ScenarioError
from dlis_market.sim.scenario import Market, Scenario, parse_scenario

RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results" / "sim_calibration.json"


def test_calibrated_demo_scenario_carries_the_measured_figures(
    shipped: Callable[[str], tuple[Scenario, Market]],
) -> None:
    sc, _ = shipped("demo_calibrated")
    measured = json.loads(RESULTS.read_text())
    cal, workers, batched = measured["calibration"], measured["workers"], measured["batched"]
    devices = sc.device_table()
    host = sc.hosts["demo"]
    assert sc.stage_model == "batched" and sc.broker_host == "demo"
    # the demo's session is one scheduling group (autogroup): the host is its measured share of the
    # cores, no background threads; the measured times ran at each round's share, the sim's are at
    # full speed (worker_share: the share averaged over each worker's pass time, per round)
    assert host.background_threads == 0.0 == batched["background"]
    assert host.cores == pytest.approx(batched["host_cores"], abs=1e-4)
    assert all(0 < x <= 1 for x in batched["worker_share"]) and 0 < batched["broker_share"] <= 1
    assert [(g.layers.start, g.layers.end) for g in sc.peers] == [(w["start"], w["end"]) for w in workers]
    for g, w, ms, link, share in zip(sc.peers, workers, cal["ms_per_layer"], cal["link_ms"], batched["worker_share"],
                                     strict=True):  # fmt: skip
        prof = g.device_profile(devices)
        assert g.host == "demo" and prof.threads == w["threads"]
        assert prof.compute_ms_per_layer == pytest.approx(ms * share, abs=1e-4), (g.device, g.layers)
        assert prof.advertised_ms_per_layer == pytest.approx(w["profiler_ms_per_layer"], abs=1e-4)
        assert prof.link_latency_ms == pytest.approx(link, abs=1e-4)
        assert prof.hazard_per_slot == 0.0
    assert sc.prefill_ratio == pytest.approx(cal["prefill_ratio"], abs=1e-5)
    for name, value in cal["overheads"].items():
        full = value if name == "admit_ms" else value * batched["broker_share"]  # admission: before the job's clock
        assert getattr(sc.overheads, name) == pytest.approx(full, abs=1e-3), name
    assert sc.batch_decode_cost == pytest.approx({int(k): v for k, v in batched["decode"].items()})
    assert sc.batch_prefill_cost == pytest.approx({int(k): v for k, v in batched["prefill"].items()})
    assert sc.pass_cv == pytest.approx(batched["pass_cv"], abs=1e-4)
    assert sc.job_speed_cv == pytest.approx(batched["job_speed_cv"], abs=1e-4)  # within a round
    # each message's measured delay beyond its link's median: `info` round trips / 2
    jitter = sorted(
        max(0.0, x / 2 - statistics.median(w["info_rtt_ms"]) / 2)
        for w in workers
        for x in w.get("busy_info_rtt_ms", w["info_rtt_ms"])  # while the sequential jobs ran
    )
    assert sc.message_jitter_ms == pytest.approx(jitter, abs=1e-4)
    assert sc.offers_track_load is False


def _one_peer(**extra: Any) -> dict[str, Any]:
    """One worker serving all 30 layers at 1 ms/layer with a free link."""
    profile = {"compute_ms_per_layer": 1.0, "link_latency_ms": 0.0, "bandwidth_bytes_per_s": 1e15, "hazard_per_slot": 0}
    return {
        "peers": [{"device": "laptop", "layers": "0:30", "profile": profile}],
        "clients": [{"concurrency": 1, "jobs": 3, "prompt_tokens": 10, "max_new_tokens": 5}],
        "prefill_ratio": 0.1,
        **extra,
    }


def _run(data: dict[str, Any], seed: int = 0) -> Any:
    sc = parse_scenario(data)
    return simulate(sc, Market.of(sc.market, Settings.load(environ={})), seed=seed)


@pytest.mark.parametrize("stage_model", ["chunked", "batched"])
def test_a_job_pays_admit_open_prefill_decode_and_close(stage_model: str) -> None:
    # one job at a time: both stage models give the same timings
    over = {"admit_ms": 50.0, "open_ms": 20.0, "close_ms": 10.0, "pass_ms": 2.0}
    r = _run(_one_peer(overheads=over, stage_model=stage_model))
    prefill = 30 * 1.0 * 0.1 * 10 + 2.0  # one pass over the prompt; it yields the first token
    decode = 30 * 1.0 + 2.0  # each further token
    assert [j.status for j in r.jobs] == ["ok"] * 3
    for j in r.jobs:
        assert 1000 * (j.started - j.arrived) == pytest.approx(50.0)
        assert 1000 * (j.first_token - j.started) == pytest.approx(20.0 + prefill, rel=1e-6)
        assert 1000 * (j.finished - j.first_token) == pytest.approx(4 * decode + 10.0, rel=1e-6)
    # closed loop: the next job is sent when the previous one finished
    assert [j.arrived for j in r.jobs[1:]] == pytest.approx([j.finished for j in r.jobs[:-1]])


def test_closed_loop_users_keep_at_most_their_number_of_jobs_in_flight() -> None:
    data = _one_peer()
    data["clients"] = [{"concurrency": 2, "jobs": 7, "prompt_tokens": 10, "max_new_tokens": 5}]
    jobs = _run(data).jobs
    assert len(jobs) == 7 and all(j.status == "ok" for j in jobs)
    for j in jobs:
        overlapping = sum(1 for k in jobs if k.arrived <= j.arrived < k.finished)
        assert overlapping <= 2


def test_a_client_class_is_open_or_closed_loop() -> None:
    data = _one_peer()
    data["clients"] = [{"rate_per_s": 1.0, "concurrency": 2}]
    with pytest.raises(ScenarioError, match="exactly one of rate_per_s"):
        parse_scenario(data)
    data["clients"] = [{"prompt_tokens": 8}]
    with pytest.raises(ScenarioError, match="exactly one of rate_per_s"):
        parse_scenario(data)


def test_a_peer_group_profile_must_be_a_valid_device_profile() -> None:
    data = _one_peer()
    data["peers"][0]["profile"]["compute_ms_per_layer"] = -1
    with pytest.raises(ScenarioError, match="profile figures are invalid"):
        parse_scenario(data)


def test_offers_from_announced_figures_route_to_the_announced_fastest_under_load() -> None:
    """The broker routes on announced throughput without load (planning.py): two concurrent jobs
    both go to the replica that announced itself faster, even though it then serves two."""
    fast = {"compute_ms_per_layer": 1.0, "advertised_ms_per_layer": 1.0, "hazard_per_slot": 0}
    slow = {"compute_ms_per_layer": 1.0, "advertised_ms_per_layer": 1.05, "hazard_per_slot": 0}
    data = {
        "peers": [{"device": "laptop", "layers": "0:30", "profile": fast},
                  {"device": "laptop", "layers": "0:30", "profile": slow}],
        "clients": [{"concurrency": 2, "jobs": 4, "prompt_tokens": 8, "max_new_tokens": 4}],
    }  # fmt: skip
    announced = _run({**data, "offers_track_load": False}).jobs
    assert {j.route for j in announced} == {(0,)}
    loaded = _run(data).jobs
    assert {j.route for j in loaded} == {(0,), (1,)}


def test_job_speed_spread_has_mean_one_and_the_given_variation() -> None:
    data = _one_peer(job_speed_cv=0.2)
    data["clients"] = [{"concurrency": 1, "jobs": 400, "prompt_tokens": 10, "max_new_tokens": 5}]
    lat = [j.finished - j.started for j in _run(data).jobs]
    base = (30 * 0.1 * 10 + 4 * 30) / 1000
    mean = sum(lat) / len(lat)
    sd = math.sqrt(sum((x - mean) ** 2 for x in lat) / (len(lat) - 1))
    assert mean / base == pytest.approx(1.0, abs=0.04)
    assert sd / mean == pytest.approx(0.2, abs=0.04)
    steady = _one_peer()
    assert len({round(j.finished - j.started, 9) for j in _run(steady).jobs}) == 1
