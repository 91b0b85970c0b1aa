"""Scale of `dlis sim`: route decisions at 1,000 and 10,000 peers, and one simulated hour.

1. Route decision (wall time of building the network state + the real ``plan_route``) for
   requests on a population drawn like ``scenarios/scale.yaml`` with random load, risk and 10 %
   of peers offline: with the sim's candidate pruning (top-k per span by objective and by price)
   vs the unpruned state (every eligible offer) in the same run. Half the requests carry a
   latency budget (the ILP path). The routes' objectives are compared: pruning must not lose.
2. The ``scale`` scenario (10,000 peers with churn, 10 jobs/s) for ``--hours`` simulated hours,
   as shipped and without servers (phones, laptops and IoT boards only: routes cross flakier
   peers and fail over): wall time, completion with failover, route decision p99.

Prints ratios and writes JSON (default bench/results/sim_scale.json).

    .venv/bin/python bench/sim_scale.py [--hours 1] [--requests 200] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dlis_market.broker.network_state import Policy, RouteRequest
from dlis_market.broker.scheduler import plan_route
from dlis_market.settings import Settings
from dlis_market.sim.engine import build_peers, simulate
from dlis_market.sim.network import PeerTable
from dlis_market.sim.report import summarize
from dlis_market.sim.scenario import Market, Population, apply_change, load_scenario
from dlis_market.types import model_id


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def route_decisions(peers: int, requests: int, unpruned: int, top_k: int) -> dict[str, Any]:
    sc = load_scenario(Path("scale"))
    if sc.population is None:
        raise SystemExit("scenarios/scale.yaml lost its population")
    sc = sc.model_copy(update={"population": Population(count=peers, mix=sc.population.mix)})
    market = Market.of(sc.market, Settings.load(environ={}))
    specs = build_peers(sc, market, seed=11)
    m = sc.model
    table = PeerTable(
        specs,
        model_id(m.name, "0x" + "00" * 20),
        m.num_layers,
        m.activation_bytes_per_token,
        m.kv_bytes_per_token_layer,
        market.min_stake,
    )
    rng = np.random.default_rng(11)
    table.sessions[:] = np.minimum(rng.integers(0, 3, peers), table.max_sessions - 1)
    table.risk[:] = rng.uniform(0.0, 0.05, peers)
    table.up[:] = rng.random(peers) > 0.1
    request = RouteRequest(model_id=table.model_id, prompt_tokens=32, max_new_tokens=32)
    policies = [Policy(), Policy(max_latency_ms_per_token=150.0)]
    pruned_ms: list[float] = []
    pruned_cpu_ms: list[float] = []
    full_ms: list[float] = []
    worse = 0
    offers_pruned = offers_full = 0
    for k in range(requests):
        policy = policies[k % 2]
        t0, c0 = time.perf_counter(), time.thread_time()
        state, _ = table.state(request, policy, top_k=top_k)
        route = plan_route(state, request, policy)
        pruned_ms.append(1000.0 * (time.perf_counter() - t0))
        pruned_cpu_ms.append(1000.0 * (time.thread_time() - c0))
        offers_pruned = len(state.offers)
        if k < unpruned:
            t0 = time.perf_counter()
            full, _ = table.state(request, policy, top_k=peers)
            best = plan_route(full, request, policy)
            full_ms.append(1000.0 * (time.perf_counter() - t0))
            offers_full = len(full.offers)
            worse += route.objective > best.objective * (1 + 1e-9)
    return {
        "peers": peers,
        "offers_pruned": offers_pruned,
        "offers_unpruned": offers_full,
        "pruned_p50_ms": _pct(pruned_ms, 50),
        "pruned_p99_ms": _pct(pruned_ms, 99),
        "pruned_cpu_p99_ms": _pct(pruned_cpu_ms, 99),
        "unpruned_p50_ms": _pct(full_ms, 50),
        "unpruned_requests": len(full_ms),
        "pruned_worse_routes": int(worse),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--unpruned", type=int, default=10, help="requests also routed on the unpruned state")
    ap.add_argument(
        "--changes",
        nargs="*",
        default=["", "remove-device=server"],
        help="what-ifs of the scale scenario to run for --hours each ('' = as shipped)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/sim_scale.json"))
    args = ap.parse_args()
    results: dict[str, Any] = {"route": []}
    for peers in (1_000, 10_000):
        r = route_decisions(peers, args.requests, args.unpruned, top_k=8)
        results["route"].append(r)
        print(
            f"{peers:>6} peers: pruned ({r['offers_pruned']} offers) p50 {r['pruned_p50_ms']:.2f} ms, "
            f"p99 {r['pruned_p99_ms']:.2f} ms (CPU {r['pruned_cpu_p99_ms']:.2f} ms) | "
            f"unpruned ({r['offers_unpruned']} offers) p50 "
            f"{r['unpruned_p50_ms']:.1f} ms | ratio {r['unpruned_p50_ms'] / r['pruned_p50_ms']:.1f}x | "
            f"worse routes {r['pruned_worse_routes']}/{r['unpruned_requests']}",
            flush=True,
        )
    results["simulated_hour"] = []
    for change in args.changes:
        sc = load_scenario(Path("scale"))
        if change:
            sc = apply_change(sc, change)
        market = Market.of(sc.market, Settings.load(environ={}))
        run = simulate(sc, market, seed=0, hours=args.hours)
        s = summarize(run)
        hour = {
            "scenario": f"scale{' with ' + change if change else ''}",
            "hours": args.hours,
            "peers": len(run.specs),
            "jobs": s["jobs"],
            "completion_pct": s["completion"],
            "failovers": s["failovers"],
            "failovers_exhausted": s["failovers_exhausted"],
            "no_route": s["no_route"],
            "route_p50_ms": s["route_p50_ms"],
            "route_p99_ms": s["route_p99_ms"],
            "route_cpu_p99_ms": s["route_cpu_p99_ms"],
            "latency_p50_s": s["latency_p50_s"],
            "latency_p99_s": s["latency_p99_s"],
            "cheaters_caught": s["cheaters_caught"],
            "wall_s": run.wall_s,
            "wall_per_simulated_hour_s": run.wall_s / args.hours,
            "target_wall_per_hour_s": 600.0,
            "online_fraction": s["online_fraction"],
            "solver": s["solver"],
            "classes": s["classes"],
        }
        results["simulated_hour"].append(hour)
        print(
            f"{hour['scenario']}, {hour['peers']} peers, {args.hours:g} h: {hour['jobs']} jobs, completion "
            f"{hour['completion_pct']:.2f} %, failovers {hour['failovers']}, route p99 {hour['route_p99_ms']:.1f} ms "
            f"(CPU {hour['route_cpu_p99_ms']:.1f} ms), "
            f"wall {hour['wall_s']:.0f} s ({hour['wall_per_simulated_hour_s'] / 600.0:.2f}x the 600 s per hour target)",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
