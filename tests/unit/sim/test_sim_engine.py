"""The simulator runs the real scheduler, sampler and money rules deterministically per seed."""

from __future__ import annotations

import math
from collections.abc import Callable

from dlis_market.settings import Settings
from dlis_market.sim.engine import simulate
from dlis_market.sim.report import summarize
from dlis_market.sim.scenario import Market, Scenario, apply_change, parse_scenario

Shipped = Callable[[str], tuple[Scenario, Market]]

WALL_CLOCK = {"route_p50_ms", "route_p99_ms", "route_cpu_p99_ms", "wall_s"}


def _comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in WALL_CLOCK}


def test_same_seed_same_run_other_seed_other_run(settings: Settings, shipped: Shipped) -> None:
    sc, market = shipped("demo")
    a = summarize(simulate(sc, market, seed=3, hours=0.2))
    b = summarize(simulate(sc, market, seed=3, hours=0.2))
    c = summarize(simulate(sc, market, seed=4, hours=0.2))
    assert a["jobs"] > 100
    assert _comparable(a) == _comparable(b)
    assert _comparable(a) != _comparable(c)


def test_money_is_conserved_through_settlement_and_slashing(settings: Settings, shipped: Shipped) -> None:
    sc, market = shipped("byzantine")
    sc = apply_change(sc, "check-fraction=1")
    r = simulate(sc, Market.of(sc.market, settings), seed=1, hours=0.2)
    ledger = r.ledger
    assert ledger.slashed > 0, "every call is checked: the cheating laptop must be slashed"
    assert ledger.forfeited > 0, "slashed under the minimum stake, its unsettled receipt is forfeited"
    assert ledger.balanced()
    assert ledger.client_paid == ledger.node_earned + ledger.fees
    completed = [j for j in r.jobs if j.status == "ok"]
    # the fee is rounded down per job (JobMarket._settleJob)
    assert 0 <= ledger.node_earned * market.fee_bps // 10_000 - ledger.fees <= len(completed)
    assert sum(p.earned for p in r.peers) == ledger.node_earned
    assert sum(p.forfeited for p in r.peers) == ledger.forfeited
    assert r.stakes_start - r.stakes_end == ledger.slashed == ledger.slash_to_reporter + ledger.slash_to_treasury
    assert ledger.slash_to_reporter == ledger.slashed * market.reporter_share_bps // 10_000
    assert r.batches >= math.ceil(len(completed) / market.settle_max_batch)


def test_a_caught_cheater_loses_and_an_unchecked_one_gains(settings: Settings, shipped: Shipped) -> None:
    sc, _ = shipped("byzantine")
    checked = apply_change(sc, "check-fraction=1")
    unchecked = apply_change(sc, "check-fraction=0")
    caught = summarize(simulate(checked, Market.of(checked.market, settings), seed=2, hours=0.2))
    free = summarize(simulate(unchecked, Market.of(unchecked.market, settings), seed=2, hours=0.2))
    assert caught["cheaters_caught"] >= 1
    assert caught["cheater_gain_dlis"] < 0
    assert free["cheaters_caught"] == 0
    assert free["cheater_gain_dlis"] > 0
    assert free["corrupted_delivered"] > caught["corrupted_delivered"]


def test_adding_peers_does_not_raise_p50_latency_when_under_provisioned(settings: Settings, shipped: Shipped) -> None:
    sc, _ = shipped("demo")
    busy = apply_change(sc, "rate=2")  # 0.6 jobs/s: the phone's 2 KV slots on [0, 10) saturate
    more = apply_change(busy, "add-peers=2")  # + a phone on [0, 10) and a laptop on [10, 20)
    base = [summarize(simulate(busy, Market.of(busy.market, settings), s, hours=0.15)) for s in range(3)]
    grown = [summarize(simulate(more, Market.of(more.market, settings), s, hours=0.15)) for s in range(3)]
    for b, g in zip(base, grown, strict=True):
        assert g["latency_p50_s"] <= b["latency_p50_s"], (b["latency_p50_s"], g["latency_p50_s"])
        assert g["completion"] >= b["completion"]
    # seed 0 keeps the added phone offline all along (same run); the others relieve the queue
    assert sum(g["latency_p50_s"] for g in grown) < 0.75 * sum(b["latency_p50_s"] for b in base)


def test_jobs_fail_over_through_plan_route_when_peers_drop(settings: Settings) -> None:
    """Flaky peers drop mid-job: the job asks plan_route again without them and still finishes."""
    flaky = {
        "compute_ms_per_layer": 5.0,
        "link_latency_ms": 10.0,
        "bandwidth_bytes_per_s": 1e7,
        "max_sessions": 4,
        "memory_bytes": 1 << 30,
        "hazard_per_slot": 0.2,  # about one drop per 5 minutes each
        "mean_down_slots": 2,
        "price_per_token_layer": 10**11,
        "cost_per_token_layer": 4 * 10**10,
    }
    sc = parse_scenario(
        {
            "name": "flaky",
            "devices": {"flaky": flaky},
            "peers": [{"device": "flaky", "layers": span, "count": 4} for span in ("0:15", "15:30")],
            "clients": [{"rate_per_s": 0.05, "prompt_tokens": 16, "max_new_tokens": 128}],
        }
    )
    market = Market.of(sc.market, settings)
    r = simulate(sc, market, seed=0, hours=0.25)
    recovered = [j for j in r.jobs if j.status == "ok" and j.failovers > 0]
    assert recovered, "no job survived a dropped peer"
    assert all(j.failovers <= market.max_failovers for j in r.jobs if j.status == "ok")
    assert all(j.failovers == market.max_failovers + 1 for j in r.jobs if j.status == "failovers")
    s = summarize(r)
    assert s["failovers"] >= len(recovered)
    assert s["completion"] > 90
    # the batched stage model under the same drops: a session that failed over or ended is not
    # waited for by any stage server after its job is released (sim/passes.py StageServer.due)
    batched = simulate(sc.model_copy(update={"stage_model": "batched"}), market, seed=0, hours=0.25)
    assert sum(j.failovers for j in batched.jobs) > 0 and all(j.status != "running" for j in batched.jobs)
    assert batched.extra["awaited_at_end"] == [0] * 8
