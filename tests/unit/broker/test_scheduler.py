"""Route scheduler: ILP against brute force, filters, budgets, errors with numbers, cloud fallback."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pulp
import pytest

from dlis_market.broker import route_solvers
from dlis_market.broker.network_state import FallbackPool, NetworkState, NodeOffer, Policy, Route, RouteRequest
from dlis_market.broker.scheduler import NoRouteError, network_capacity, plan_route
from dlis_market.types import LayerRange, ModelId, NodeId, PeerId, model_id

MODEL = model_id("test-model", "0x" + "00" * 20)
KV = 64  # KV bytes per token per layer in these tests
ACT = 1000  # activation bytes per token


def offer(name: str, start: int, end: int, **kw: object) -> NodeOffer:
    fields: dict[str, object] = {
        "node_id": NodeId(name),
        "peer_id": PeerId("peer-" + name),
        "model_id": MODEL,
        "served": LayerRange(start=start, end=end),
        "compute_ms_per_layer": 1.0,
        "network_latency_ms": 5.0,
        "bandwidth_bytes_per_s": 1e6,  # 1 ms for ACT bytes
        "free_kv_slots": 4,
        "kv_bytes_per_token_layer": KV,
        "free_memory_bytes": 10**9,
        "price_per_token_layer": 10,
        "stake_ok": True,
        "reputation_bps": 9000,
        "failure_risk": 0.01,
        "attestation_verified": True,
    }
    fields.update(kw)
    return NodeOffer.model_validate(fields)


def network(num_layers: int, *offers: NodeOffer) -> NetworkState:
    return NetworkState(model_id=MODEL, num_layers=num_layers, activation_bytes_per_token=ACT, offers=offers)


REQ = RouteRequest(model_id=MODEL, prompt_tokens=90, max_new_tokens=10)  # 100 tokens
POOL = FallbackPool(
    node_id=NodeId("cloud"), peer_id=PeerId("peer-cloud"), price_per_token=500, compute_ms_per_token=20.0,
    network_latency_ms=30.0,
)  # fmt: skip


def check_route(route: Route, state: NetworkState, request: RouteRequest, policy: Policy) -> None:
    """The route covers [0, L) contiguously with distinct eligible nodes inside their offers and budgets."""
    by_id = {o.node_id: o for o in state.offers}
    at = 0
    for hop in route.hops:
        assert hop.layers.start == at
        o = by_id[hop.node_id]
        assert o.served.start <= hop.layers.start and hop.layers.end <= o.served.end
        assert request.total_tokens * o.kv_bytes_per_token_layer * hop.layers.size <= o.free_memory_bytes
        assert o.stake_ok and o.free_kv_slots >= 1 and o.reputation_bps >= policy.min_reputation_bps
        assert o.attestation_verified or policy.privacy == "low"
        at = hop.layers.end
    assert at == state.num_layers
    assert len({h.node_id for h in route.hops}) == len(route.hops)
    assert route.cost == sum(h.cost for h in route.hops)
    if policy.max_cost is not None:
        assert route.cost <= policy.max_cost
    if policy.max_latency_ms_per_token is not None:
        assert route.latency_ms_per_token <= policy.max_latency_ms_per_token * (1 + 1e-9)


# --- brute force --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    objective: float
    latency: float
    cost: int


def enumerate_routes(state: NetworkState, request: RouteRequest, policy: Policy) -> list[Candidate]:
    """Every partition of [0, L) into sub-ranges served by distinct eligible nodes (no budgets)."""
    tokens = request.total_tokens
    eligible = [
        o
        for o in state.offers
        if o.stake_ok
        and o.reputation_bps >= policy.min_reputation_bps
        and (policy.privacy == "low" or o.attestation_verified)
        and o.free_kv_slots >= 1
    ]
    out: list[Candidate] = []

    def walk(at: int, used: frozenset[str], obj: float, lat: float, cost: int) -> None:
        if at == state.num_layers:
            out.append(Candidate(obj, lat, cost))
            return
        for o in eligible:
            if o.node_id in used or not o.served.start <= at < o.served.end:
                continue
            transfer = o.network_latency_ms + 1000.0 * state.activation_bytes_per_token / o.bandwidth_bytes_per_s
            for end in range(at + 1, o.served.end + 1):
                if tokens * o.kv_bytes_per_token_layer * (end - at) > o.free_memory_bytes:
                    break
                compute = o.compute_ms_per_layer * (end - at)
                walk(
                    end,
                    used | {o.node_id},
                    obj
                    + policy.weight_compute * compute
                    + policy.weight_transfer * transfer
                    + policy.weight_risk * o.failure_risk,
                    lat + compute + transfer,
                    cost + o.price_per_token_layer * (end - at) * tokens,
                )

    walk(0, frozenset(), 0.0, 0.0, 0)
    return out


def random_instance(seed: int) -> tuple[NetworkState, RouteRequest]:
    rng = random.Random(seed)
    num_layers = rng.randint(6, 9)
    offers = []
    for k in range(rng.randint(5, 8)):
        size = rng.randint(1, num_layers)
        start = rng.randint(0, num_layers - size)
        speed = rng.uniform(0.5, 4.0)
        offers.append(
            offer(
                f"n{k}",
                start,
                start + size,
                compute_ms_per_layer=speed,
                network_latency_ms=rng.uniform(1, 20),
                bandwidth_bytes_per_s=rng.uniform(1e5, 1e7),
                free_kv_slots=rng.choice([0, 1, 2, 5, 5, 5]),
                free_memory_bytes=rng.randint(1, size + 1) * 100 * KV,  # memory for 1..size+1 layers
                price_per_token_layer=int(rng.uniform(1, 20) / speed) + rng.randint(0, 3),
                stake_ok=rng.random() > 0.1,
                reputation_bps=rng.randint(4000, 10_000),
                failure_risk=rng.uniform(0, 0.05),
                attestation_verified=rng.random() < 0.7,
            )
        )
    return network(num_layers, *offers), REQ


def random_policy(seed: int, routes: list[Candidate]) -> Policy:
    rng = random.Random(1000 + seed)
    weights = {"weight_compute": rng.uniform(0, 2), "weight_transfer": rng.uniform(0, 2), "weight_risk": 1000.0}
    common: dict[str, object] = {
        **weights,
        "privacy": rng.choice(["low", "low", "high"]),
        "min_reputation_bps": rng.choice([0, 0, 5000]),
    }
    mode = seed % 4  # none, cost, latency, both; budgets at quantiles so that they often bind
    if mode == 0 or not routes:
        return Policy.model_validate(common)
    costs = sorted(r.cost for r in routes)
    lats = sorted(r.latency for r in routes)
    if mode in (1, 3):
        common["max_cost"] = costs[int(rng.uniform(0, 0.5) * len(costs))]
    if mode in (2, 3):
        common["max_latency_ms_per_token"] = lats[int(rng.uniform(0, 0.5) * len(lats))]
    return Policy.model_validate(common)


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_matches_brute_force_on_small_instances(solver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cbc_calls = []
    real_ilp = route_solvers.ilp

    def counting_ilp(*args: object, **kwargs: object) -> object:
        cbc_calls.append(1)
        return real_ilp(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(route_solvers, "ilp", counting_ilp)
    solved = infeasible = missed = 0
    for seed in range(60):
        state, request = random_instance(seed)
        base = Policy(privacy="low" if seed % 3 else "high")
        policy = random_policy(seed, enumerate_routes(state, request, base))
        routes = enumerate_routes(state, request, policy)
        ok = [
            r
            for r in routes
            if (policy.max_cost is None or r.cost <= policy.max_cost)
            and (policy.max_latency_ms_per_token is None or r.latency <= policy.max_latency_ms_per_token)
        ]
        if not ok:
            with pytest.raises(NoRouteError) as err:
                plan_route(state, request, policy, solver=solver)  # type: ignore[arg-type]
            assert solver == "greedy" or err.value.constraint != "solver"  # the ILP proves infeasibility
            infeasible += 1
            continue
        best = min(r.objective for r in ok)
        if solver == "greedy":  # a heuristic: may miss, never beats the optimum, never breaks a rule
            try:
                route = plan_route(state, request, policy, solver="greedy")
            except NoRouteError as exc:
                assert exc.constraint == "solver", f"seed {seed}: {exc}"
                missed += 1
                continue
            check_route(route, state, request, policy)
            assert route.objective >= best - 1e-6
            continue
        route = plan_route(state, request, policy)
        if not route.optimal:
            # Once in a CI run (of six on 2026-11-27) CBC ran one of these programs to its 10 s
            # limit, with the optimum found but not proven; it never repeated locally. One retry
            # keeps the test strict: a route that is not proven optimal twice still fails.
            route = plan_route(state, request, policy)
        check_route(route, state, request, policy)
        assert route.objective == pytest.approx(best, abs=1e-6), f"seed {seed}"
        assert route.optimal and route.solver == "ilp", f"seed {seed}: {route.solve_time_ms:.0f} ms"
        solved += 1
    if solver == "greedy":
        assert missed < 15
        return
    assert solved >= 25 and infeasible >= 5  # the instances exercise both outcomes
    if solver == "ilp":
        assert len(cbc_calls) >= 10  # and the coupling constraints bind often enough to need CBC


# --- coupling constraints: where the shortest path is not enough --------------------------------


def fast_slow_network() -> NetworkState:
    fast = {"compute_ms_per_layer": 1.0, "price_per_token_layer": 10}
    slow = {"compute_ms_per_layer": 50.0, "price_per_token_layer": 1}
    return network(
        2, offer("F0", 0, 1, **fast), offer("F1", 1, 2, **fast), offer("S0", 0, 1, **slow), offer("S1", 1, 2, **slow)
    )


def test_ilp_finds_feasible_route_where_shortest_path_breaks_the_budget() -> None:
    state = fast_slow_network()
    free = plan_route(state, REQ, Policy())
    assert [h.node_id for h in free.hops] == ["F0", "F1"] and free.cost == 2000  # shortest path: 10+10 per token
    policy = Policy(max_cost=1100)
    route = plan_route(state, REQ, policy)
    check_route(route, state, REQ, policy)
    assert route.solver == "ilp" and route.optimal and route.cost == 1100
    assert sorted(h.node_id[0] for h in route.hops) == ["F", "S"]  # one fast and one slow hop
    greedy = plan_route(state, REQ, policy, solver="greedy")
    check_route(greedy, state, REQ, policy)
    assert [h.node_id for h in greedy.hops] == ["S0", "S1"]  # penalised shortest paths never mix
    assert greedy.objective > route.objective + 40


def test_each_node_used_once() -> None:
    # A serves [0, 3) cheaply; B only layer 1. Reusing A around B would be the shortest path.
    state = network(
        3,
        offer("A", 0, 3, compute_ms_per_layer=1.0),
        offer("B", 1, 2, compute_ms_per_layer=0.0, network_latency_ms=0.0),
        offer("C", 2, 3, compute_ms_per_layer=100.0),
    )
    policy = Policy(weight_transfer=0.0, weight_risk=0.0)
    greedy = plan_route(state, REQ, policy, solver="greedy")  # repairs A, B, A by merging A's two uses
    assert [h.node_id for h in greedy.hops] == ["A"]
    route = plan_route(state, REQ, policy)  # A, B, A would cost 2 ms; A alone costs 3
    assert [h.node_id for h in route.hops] == ["A"] and route.objective == pytest.approx(3.0) and route.optimal


def test_memory_limits_the_sub_range() -> None:
    # 100 tokens x 64 B per layer: fast A holds 2 layers of [0, 4), so slow B takes the other 2.
    state = network(4, offer("A", 0, 4, free_memory_bytes=2 * 100 * KV), offer("B", 0, 4, compute_ms_per_layer=20.0))
    route = plan_route(state, REQ, Policy())
    assert sorted((h.node_id, h.layers.size) for h in route.hops) == [("A", 2), ("B", 2)]
    assert route.objective == pytest.approx(2 * 1.0 + 2 * 20.0 + 2 * 6.0 + 1000 * 0.02)


def test_failure_risk_is_the_sum_of_hop_risks() -> None:
    state = network(4, offer("A", 0, 2, failure_risk=0.02), offer("B", 2, 4, failure_risk=0.03))
    route = plan_route(state, REQ, Policy())
    assert route.failure_risk == pytest.approx(0.05)
    assert route.transfer_ms == pytest.approx(2 * (5.0 + 1.0))
    assert route.objective == pytest.approx(route.compute_ms + route.transfer_ms + 1000 * 0.05)


def test_large_token_amounts_are_exact() -> None:
    price = 10**18 + 1  # 18-decimal token units: beyond what a double holds exactly
    state = network(2, offer("A", 0, 1, price_per_token_layer=price), offer("B", 1, 2, price_per_token_layer=price))
    exact = 2 * price * REQ.total_tokens
    assert plan_route(state, REQ, Policy(max_cost=exact)).cost == exact
    with pytest.raises(NoRouteError) as err:
        plan_route(state, REQ, Policy(max_cost=exact - 1))
    assert err.value.constraint == "max_cost" and str(exact) in str(err.value)


# --- filters -------------------------------------------------------------------------------------


def test_privacy_high_admits_only_attested_nodes() -> None:
    state = network(2, offer("fast", 0, 2, attestation_verified=False), offer("tee", 0, 2, compute_ms_per_layer=9.0))
    assert plan_route(state, REQ, Policy()).hops[0].node_id == "fast"
    assert plan_route(state, REQ, Policy(privacy="high")).hops[0].node_id == "tee"
    only_unattested = network(2, offer("fast", 0, 2, attestation_verified=False))
    with pytest.raises(NoRouteError) as err:
        plan_route(only_unattested, REQ, Policy(privacy="high"))
    assert err.value.constraint == "coverage" and "attestation" in str(err.value)


def test_unstaked_low_reputation_and_full_nodes_are_excluded() -> None:
    state = network(
        3,
        offer("ok", 0, 3, compute_ms_per_layer=9.0),
        offer("unstaked", 0, 3, stake_ok=False),
        offer("shady", 0, 3, reputation_bps=3000),
        offer("full", 0, 3, free_kv_slots=0),
    )
    route = plan_route(state, REQ, Policy(min_reputation_bps=5000))
    assert [h.node_id for h in route.hops] == ["ok"]


def test_uncovered_layers_are_named_with_reasons() -> None:
    state = network(
        8,
        offer("A", 0, 3),
        offer("B", 5, 8),
        offer("C", 3, 5, stake_ok=False),
        offer("D", 2, 4, reputation_bps=4000),
        offer("E", 4, 5, free_memory_bytes=10),
    )
    with pytest.raises(NoRouteError) as err:
        plan_route(state, REQ, Policy(min_reputation_bps=5000))
    e = err.value
    assert e.constraint == "coverage" and e.uncovered == (LayerRange(start=3, end=5),)
    text = str(e)
    assert "layers [3, 5)" in text and "3 offers excluded" in text
    assert "C [3, 5): not staked" in text and "reputation 4000 bps < min 5000 bps" in text
    assert "10 B free < 6400 B" in text


def test_offer_beyond_the_model_is_ignored() -> None:
    state = network(2, offer("bad", 0, 5, compute_ms_per_layer=0.0), offer("good", 0, 2))
    assert [h.node_id for h in plan_route(state, REQ, Policy()).hops] == ["good"]


# --- binding constraints, with numbers -------------------------------------------------------------


def test_max_latency_binds_with_numbers() -> None:
    state = network(2, offer("A", 0, 2, compute_ms_per_layer=10.0))  # 20 + 5 + 1 = 26 ms
    with pytest.raises(NoRouteError) as err:
        plan_route(state, REQ, Policy(max_latency_ms_per_token=25.0))
    assert err.value.constraint == "max_latency"
    assert "max_latency_ms_per_token 25" in str(err.value) and "26 ms/token" in str(err.value)


def test_max_cost_binds_with_numbers() -> None:
    state = network(2, offer("A", 0, 2))  # 10 units x 2 layers x 100 tokens
    with pytest.raises(NoRouteError) as err:
        plan_route(state, REQ, Policy(max_cost=1999))
    assert err.value.constraint == "max_cost"
    assert "max_cost 1999" in str(err.value) and "costs 2000 token units for 100 tokens" in str(err.value)


def test_latency_and_cost_bind_together() -> None:
    state = fast_slow_network()  # fast route 2000 units / 14 ms; slow route 200 units / 112 ms
    with pytest.raises(NoRouteError) as err:
        plan_route(state, REQ, Policy(max_cost=1000, max_latency_ms_per_token=50.0))
    assert err.value.constraint == "max_latency+max_cost"
    assert "costs 2000 > 1000" in str(err.value) and "takes 112 ms/token > 50" in str(err.value)


def test_node_capacity_when_memory_forbids_covering() -> None:
    state = network(4, offer("A", 0, 4, free_memory_bytes=2 * 100 * KV))
    with pytest.raises(NoRouteError) as err:
        plan_route(state, REQ, Policy())
    assert err.value.constraint == "node_capacity" and "A serves [0, 4) but holds 2 layers" in str(err.value)


def test_model_mismatch() -> None:
    other = RouteRequest(model_id=model_id("other", "0x" + "00" * 20), prompt_tokens=1, max_new_tokens=1)
    with pytest.raises(NoRouteError) as err:
        plan_route(network(1, offer("A", 0, 1)), other, Policy())
    assert err.value.constraint == "model"


# --- solver failure ------------------------------------------------------------------------------


def test_solver_failure_falls_back_to_greedy(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: pulp.LpProblem, *args: object, **kwargs: object) -> int:
        raise pulp.PulpSolverError("cbc crashed")

    monkeypatch.setattr(pulp.LpProblem, "solve", broken)
    policy = Policy(max_cost=1100)
    route = plan_route(fast_slow_network(), REQ, policy)
    assert route.solver == "greedy" and not route.optimal
    check_route(route, fast_slow_network(), REQ, policy)


def test_time_limited_incumbent_is_used_but_not_called_optimal(monkeypatch: pytest.MonkeyPatch) -> None:
    real_ilp = route_solvers.ilp

    def stopped_at_limit(*args: object, **kwargs: object) -> object:
        _, path = real_ilp(*args, **kwargs)  # type: ignore[arg-type]
        return "feasible", path  # as CBC reports a time-limit stop with an incumbent

    monkeypatch.setattr(route_solvers, "ilp", stopped_at_limit)
    route = plan_route(fast_slow_network(), REQ, Policy(max_cost=1100))
    assert route.solver == "ilp" and not route.optimal and route.cost == 1100  # better than greedy's S0, S1


# --- cloud fallback -------------------------------------------------------------------------------


def test_fallback_when_no_route() -> None:
    state = network(4, offer("A", 0, 2))
    route = plan_route(state, REQ, Policy(), POOL)
    assert route.fallback and route.solver == "fallback"
    assert [(h.node_id, str(h.layers)) for h in route.hops] == [("cloud", "[0, 4)")]
    assert route.cost == 500 * 100 and route.latency_ms_per_token == 50.0
    assert route.fallback_reason is not None and "layers [2, 4)" in route.fallback_reason


def test_fallback_when_capacity_below_threshold() -> None:
    state = network(2, offer("A", 0, 1, free_kv_slots=2), offer("B", 1, 2, free_kv_slots=3), offer("C", 1, 2))
    assert network_capacity(state, REQ, Policy()) == 2
    pool = POOL.model_copy(update={"min_network_capacity_slots": 3})
    route = plan_route(state, REQ, Policy(), pool)
    assert route.fallback and "network capacity 2 sessions < threshold 3" in (route.fallback_reason or "")
    assert not plan_route(state, REQ, Policy(), POOL).fallback  # threshold 0: the network serves it


def test_fallback_must_meet_the_policy_too() -> None:
    state = network(4, offer("A", 0, 2))
    with pytest.raises(NoRouteError) as err:
        plan_route(state, REQ, Policy(max_cost=40_000), POOL)
    assert "layers [2, 4)" in str(err.value) and "fallback pool costs 50000 > max_cost 40000" in str(err.value)
    untrusted = POOL.model_copy(update={"attestation_verified": False})
    with pytest.raises(NoRouteError, match="fallback pool has no verified attestation"):
        plan_route(state, REQ, Policy(privacy="high"), untrusted)


def test_unsplittable_offers_are_used_whole_or_not_at_all() -> None:
    """A worker that runs one shard serves exactly its span: the route cannot cut it."""
    mid = ModelId("0x" + "ab" * 32)

    def offer(node: str, a: int, b: int, ms: float) -> NodeOffer:
        return NodeOffer(
            node_id=NodeId(node), peer_id=PeerId("p" + node), model_id=mid, served=LayerRange(start=a, end=b),
            compute_ms_per_layer=ms, network_latency_ms=1.0, bandwidth_bytes_per_s=1e9, free_kv_slots=4,
            kv_bytes_per_token_layer=0, free_memory_bytes=1 << 30, price_per_token_layer=1, stake_ok=True,
            reputation_bps=10_000, failure_risk=0.0, attestation_verified=True, splittable=False,
        )  # fmt: skip

    # the fast node covers [0, 6) but only [0, 3) is needed before the slow [3, 6): no whole-span tiling exists
    state = NetworkState(
        model_id=mid, num_layers=6, activation_bytes_per_token=100,
        offers=(offer("fast", 0, 6, 0.1), offer("slow", 3, 6, 5.0), offer("head", 0, 3, 5.0)),
    )  # fmt: skip
    route = plan_route(state, RouteRequest(model_id=mid, prompt_tokens=4, max_new_tokens=4), Policy())
    assert [(h.node_id, h.layers.start, h.layers.end) for h in route.hops] == [("fast", 0, 6)]
    only_parts = state.model_copy(
        update={
            "offers": (
                offer("fast", 0, 6, 0.1).model_copy(update={"free_kv_slots": 0}),
                offer("slow", 3, 6, 5.0),
                offer("head", 0, 3, 5.0),
            )
        }
    )
    route = plan_route(only_parts, RouteRequest(model_id=mid, prompt_tokens=4, max_new_tokens=4), Policy())
    assert [(h.node_id, h.layers.start) for h in route.hops] == [("head", 0), ("slow", 3)]
