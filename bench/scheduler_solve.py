"""Benchmark: route scheduler on 200 nodes x 30 layers, the ILP against the greedy baseline.

Random networks with fixed seeds: each node serves a span of 3-15 layers (so ~8k edges
``(node, i -> j)``), faster nodes charge more, some nodes are memory-limited, unstaked,
unattested or of low reputation. Per network, four policies:

* ``open``: no budgets (the shortest path usually meets every constraint: no CBC call);
* ``cost``: ``max_cost`` at 70 % of the open route's cost;
* ``cost_latency``: that and ``max_latency_ms_per_token`` at 110 % of the open route's latency;
* ``private``: ``privacy="high"``, ``min_reputation_bps=5000`` and the ``cost`` budget.

For each: ``plan_route`` (ILP with the relaxation shortcut, incumbent pruning and greedy fallback)
vs ``plan_route(solver="greedy")``, wall and CPU time (this process plus the CBC child), and the
objective ratio greedy / ILP (1.0 = greedy optimal). ``cbc_full`` also times one CBC run on the
whole program (every edge, no shortcut, no pruning), to show what the reductions buy.

    .venv/bin/python bench/scheduler_solve.py [--seeds 5] [--out bench/results/scheduler_solve.json]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from dlis_market.broker import route_graph, scheduler
from dlis_market.broker.network_state import NetworkState, NodeOffer, Policy, Route, RouteRequest
from dlis_market.broker.scheduler import NoRouteError, plan_route
from dlis_market.types import LayerRange, NodeId, PeerId, model_id

MODEL = model_id("bench-model", "0x" + "00" * 20)
NODES, LAYERS = 200, 30
HIDDEN_BYTES = 2048 * 2  # hidden size 2048, fp16
KV_PER_TOKEN_LAYER = 2 * 2 * 256 * 2  # K and V, 2 KV heads x 256, fp16
REQUEST = RouteRequest(model_id=MODEL, prompt_tokens=1024, max_new_tokens=256)
TIME_LIMIT_S = 10.0


def network(seed: int) -> NetworkState:
    rng = random.Random(seed)
    offers = []
    for k in range(NODES):
        size = rng.randint(3, 15)
        start = rng.randint(0, LAYERS - size)
        speed = rng.uniform(0.5, 5.0)  # ms per token per layer
        layers_fit = rng.choice([size, size, size, rng.randint(1, size)])  # a quarter are memory-limited
        offers.append(
            NodeOffer(
                node_id=NodeId(f"0xnode{k:03d}"),
                peer_id=PeerId(f"peer{k:03d}"),
                model_id=MODEL,
                served=LayerRange(start=start, end=start + size),
                compute_ms_per_layer=speed,
                network_latency_ms=rng.uniform(2, 40),
                bandwidth_bytes_per_s=rng.uniform(1e6, 1e8),
                free_kv_slots=rng.choice([0, 1, 2, 4, 8, 8]),
                kv_bytes_per_token_layer=KV_PER_TOKEN_LAYER,
                free_memory_bytes=layers_fit * REQUEST.total_tokens * KV_PER_TOKEN_LAYER,
                price_per_token_layer=int(rng.uniform(1, 10) / speed * 10**12),
                stake_ok=rng.random() > 0.05,
                reputation_bps=rng.randint(3000, 10_000),
                failure_risk=rng.uniform(0, 0.05),
                attestation_verified=rng.random() < 0.6,
            )
        )
    return NetworkState(
        model_id=MODEL, num_layers=LAYERS, activation_bytes_per_token=HIDDEN_BYTES, offers=tuple(offers)
    )


def cpu_s() -> float:
    own, child = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + child.ru_utime + child.ru_stime


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(result or the NoRouteError, wall ms, cpu ms)``."""
    c0, t0 = cpu_s(), time.perf_counter()
    try:
        out = fn()
    except NoRouteError as exc:
        out = exc
    return out, 1000 * (time.perf_counter() - t0), 1000 * (cpu_s() - c0)


def policies(state: NetworkState) -> dict[str, Policy]:
    open_route = plan_route(state, REQUEST, Policy())
    cost = int(open_route.cost * 0.7)
    lat = open_route.latency_ms_per_token * 1.1
    return {
        "open": Policy(),
        "cost": Policy(max_cost=cost),
        "cost_latency": Policy(max_cost=cost, max_latency_ms_per_token=lat),
        "private": Policy(privacy="high", min_reputation_bps=5000, max_cost=cost),
    }


def cbc_full(state: NetworkState, policy: Policy) -> tuple[str, float, float, int]:
    # Private helpers on purpose: the whole program, as plan_route would send it without reductions.
    pb = route_graph.build_problem(state, REQUEST, policy)
    weights = [e.objective for e in pb.edges]
    (status, _), wall, cpu = timed(partial(scheduler._ilp, pb, weights, budgets=True, time_limit_s=TIME_LIMIT_S))
    return status, wall, cpu, len(pb.edges)


def run(seeds: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for seed in range(seeds):
        state = network(seed)
        for name, policy in policies(state).items():
            ilp, ilp_wall, ilp_cpu = timed(partial(plan_route, state, REQUEST, policy, time_limit_s=TIME_LIMIT_S))
            greedy, g_wall, g_cpu = timed(partial(plan_route, state, REQUEST, policy, solver="greedy"))
            full_status, full_wall, full_cpu, edges = cbc_full(state, policy)
            row: dict[str, Any] = {
                "seed": seed,
                "policy": name,
                "edges": edges,
                "ilp_solver": ilp.solver if isinstance(ilp, Route) else ilp.constraint,
                "ilp_optimal": isinstance(ilp, Route) and ilp.optimal,
                "ilp_objective": ilp.objective if isinstance(ilp, Route) else None,
                "ilp_wall_ms": round(ilp_wall, 1),
                "ilp_cpu_ms": round(ilp_cpu, 1),
                "greedy_objective": greedy.objective if isinstance(greedy, Route) else None,
                "greedy_wall_ms": round(g_wall, 1),
                "greedy_cpu_ms": round(g_cpu, 1),
                "cbc_full_status": full_status,
                "cbc_full_wall_ms": round(full_wall, 1),
                "cbc_full_cpu_ms": round(full_cpu, 1),
            }
            if isinstance(ilp, Route) and isinstance(greedy, Route):
                row["objective_ratio_greedy_to_ilp"] = round(greedy.objective / ilp.objective, 4)
            rows.append(row)
            print(json.dumps(row))
    summary = {}
    for name in ("open", "cost", "cost_latency", "private"):
        rs = [r for r in rows if r["policy"] == name]
        ratios = [r["objective_ratio_greedy_to_ilp"] for r in rs if "objective_ratio_greedy_to_ilp" in r]
        summary[name] = {
            "instances": len(rs),
            "ilp_routes": sum(r["ilp_objective"] is not None for r in rs),
            "ilp_proven_optimal": sum(r["ilp_optimal"] for r in rs),
            "greedy_routes": sum(r["greedy_objective"] is not None for r in rs),
            "ilp_wall_ms_median": statistics.median(r["ilp_wall_ms"] for r in rs),
            "ilp_wall_ms_max": max(r["ilp_wall_ms"] for r in rs),
            "ilp_cpu_ms_median": statistics.median(r["ilp_cpu_ms"] for r in rs),
            "greedy_wall_ms_median": statistics.median(r["greedy_wall_ms"] for r in rs),
            "greedy_cpu_ms_median": statistics.median(r["greedy_cpu_ms"] for r in rs),
            "cbc_full_wall_ms_median": statistics.median(r["cbc_full_wall_ms"] for r in rs),
            "cbc_full_cpu_ms_median": statistics.median(r["cbc_full_cpu_ms"] for r in rs),
            "time_ratio_ilp_to_greedy_cpu": round(
                statistics.median(r["ilp_cpu_ms"] / r["greedy_cpu_ms"] for r in rs), 2
            ),
            "time_ratio_cbc_full_to_ilp_cpu": round(
                statistics.median(r["cbc_full_cpu_ms"] / r["ilp_cpu_ms"] for r in rs), 2
            ),
            "objective_ratio_greedy_to_ilp_mean": round(statistics.fmean(ratios), 4) if ratios else None,
            "objective_ratio_greedy_to_ilp_max": max(ratios) if ratios else None,
        }
    return {
        "nodes": NODES,
        "layers": LAYERS,
        "tokens": REQUEST.total_tokens,
        "seeds": seeds,
        "time_limit_s": TIME_LIMIT_S,
        "summary": summary,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scheduler_solve.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    report = run(args.seeds)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, s in report["summary"].items():
        print(
            f"{name:>12}: ILP {s['ilp_cpu_ms_median']:.0f} ms cpu ({s['ilp_wall_ms_median']:.0f} wall, max "
            f"{s['ilp_wall_ms_max']:.0f}), greedy {s['greedy_cpu_ms_median']:.0f} ms cpu; ILP/greedy time "
            f"x{s['time_ratio_ilp_to_greedy_cpu']:.1f}; full CBC/ILP time x{s['time_ratio_cbc_full_to_ilp_cpu']:.1f}; "
            f"greedy/ILP objective mean {s['objective_ratio_greedy_to_ilp_mean']}, max "
            f"{s['objective_ratio_greedy_to_ilp_max']}; routes ILP {s['ilp_routes']}/{s['instances']} "
            f"greedy {s['greedy_routes']}/{s['instances']}"
        )
    print(f"wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
