"""Route scheduler: a pure function from (network state, request, policy) to a route.

Model. Layer boundaries ``0..L`` are the vertices of a DAG; an edge ``(node, i -> j)`` means
"this node serves layers ``[i, j)`` for this job" and exists for every ``i < j`` inside the node's
served range whose KV cache fits the node's free memory
(``tokens * kv_bytes_per_token_layer * (j - i) <= free_memory_bytes``). A route is a path from
``0`` to ``L``. The integer program has one binary variable per edge and:

* flow conservation (one unit leaves 0, arrives at L; in a DAG that is exactly one path);
* each node used at most once (one session, one contiguous sub-range per job);
* ``sum latency <= max_latency_ms_per_token`` and ``sum cost <= max_cost`` when the policy sets them;
* objective ``a * compute_ms + b * transfer_ms + g * failure_risk``, all linear per edge:
  compute is ``compute_ms_per_layer * (j - i)``, transfer is the node's latency plus the
  activation bytes of one token over its bandwidth, and failure risk is the node's probability,
  summed over hops. The sum is the union bound on ``1 - prod(1 - p)``, exact to first order and
  what keeps the program linear.

Before the program: offers of other models, unstaked nodes, nodes under ``min_reputation_bps``,
unattested nodes under ``privacy="high"``, nodes with no free KV slot and nodes whose memory cannot
hold one layer of this job's KV cache are filtered out. The shortest path on the DAG (dynamic
programming) is the program without its coupling constraints (node once, budgets): when it meets
them it is optimal and CBC is not called. Otherwise the greedy route below is CBC's incumbent and
edges that cannot beat it or fit the budgets (by shortest-path bounds) are dropped before CBC
gets ``time_limit_s`` (without preprocessing or primal heuristics: cheaper here); if it fails or
stops without a solution, a greedy search takes over (shortest paths on the DAG with Lagrangian
penalties on the budgets, each checked against every constraint). Not modelled: queueing and
batching at nodes, prefill vs decode speed, correlation between failures, contention between jobs
routed at the same time (the KV-slot and capacity checks are per job).

If nothing satisfies the policy, or the network's capacity is under the fallback pool's threshold,
the job goes to the configured :class:`FallbackPool`; without one, :class:`NoRouteError` says which
layers are uncovered or which constraint binds, with the numbers.

The problem is built in :mod:`.route_graph`, solved in :mod:`.route_solvers`; here
:func:`plan_route` tries them in order, explains a failure (re-running
:func:`~dlis_market.broker.route_solvers.min_route` once per budget) and falls back.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Literal

from dlis_market.broker.network_state import (
    FallbackPool,
    Hop,
    NetworkState,
    Policy,
    Route,
    RouteRequest,
    SolverName,
)
from dlis_market.broker.route_graph import REL_TOL, Edge, RouteProblem, build_problem, uncovered
from dlis_market.broker.route_graph import capacity as network_slots
from dlis_market.broker.route_solvers import ilp as _ilp  # noqa: F401 - bench/scheduler_solve.py times it alone
from dlis_market.broker.route_solvers import min_route, solve
from dlis_market.errors import BrokerError
from dlis_market.types import LayerRange

Constraint = Literal["model", "coverage", "node_capacity", "max_latency", "max_cost", "max_latency+max_cost", "solver"]


class NoRouteError(BrokerError):
    """No route satisfies the policy (the API answers 503). ``constraint`` names what binds."""

    def __init__(self, reason: str, *, constraint: Constraint, uncovered: tuple[LayerRange, ...] = ()) -> None:
        super().__init__(
            f"no route: {reason}. Relax the policy (max_latency_ms_per_token, max_cost, privacy, "
            "min_reputation_bps) or retry when more nodes serve the model."
        )
        self.reason = reason
        self.constraint: Constraint = constraint
        self.uncovered = uncovered


def network_capacity(state: NetworkState, request: RouteRequest, policy: Policy) -> int:
    """Sessions like this one the network could hold at once: min over layers of free KV slots.

    Counts only offers eligible under ``policy``; an upper bound (a session takes one slot on
    some node at every layer), and 0 when a layer is uncovered.
    """
    return network_slots(build_problem(state, request, policy))


def _coverage_error(pb: RouteProblem, gaps: tuple[LayerRange, ...]) -> NoRouteError:
    parts = []
    for gap in gaps:
        near = [(o, kind, why) for o, kind, why in pb.excluded if o.served.start < gap.end and gap.start < o.served.end]
        if not near:
            parts.append(f"layers {gap} are served by no node")
            continue
        counts = Counter(kind for _, kind, _ in near)
        shown = "; ".join(f"{o.node_id} {o.served}: {why}" for o, _, why in near[:3])
        more = f"; and {len(near) - 3} more" if len(near) > 3 else ""
        summary = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
        parts.append(f"layers {gap} have no eligible node ({len(near)} offers excluded: {summary}; {shown}{more})")
    return NoRouteError("; ".join(parts), constraint="coverage", uncovered=gaps)


def _diagnose(pb: RouteProblem, time_limit_s: float, *, proven: bool, solver: str) -> NoRouteError:
    """Why no route exists: node capacity, or which budget binds and by how much.

    ``proven``: the ILP showed that no route meets the policy (else a heuristic just found none).
    """
    deadline = time.perf_counter() + time_limit_s
    policy, tokens = pb.policy, pb.request.total_tokens
    free, _ = min_route(pb, [e.objective for e in pb.edges], deadline)
    if free is None:
        limited = [
            f"{o.node_id} serves {o.served} but holds {cap} layers"
            for o, cap in zip(pb.offers, pb.layer_caps, strict=True)
            if cap < o.served.size
        ]
        return NoRouteError(
            f"every layer has an eligible node but no set of distinct nodes covers [0, {pb.num_layers}) with "
            f"one contiguous sub-range each within free memory for {tokens} tokens"
            + (f" (memory-limited: {'; '.join(limited[:5])})" if limited else ""),
            constraint="node_capacity",
        )
    lat_max, cost_max = policy.max_latency_ms_per_token, policy.max_cost
    fastest, f_exact = (
        min_route(pb, [e.latency_ms for e in pb.edges], deadline) if lat_max is not None else (None, False)
    )
    cheapest, c_exact = (
        min_route(pb, [float(e.cost) for e in pb.edges], deadline) if cost_max is not None else (None, False)
    )
    binds: list[tuple[Constraint, str]] = []
    if lat_max is not None and fastest is not None:
        f_lat = sum(e.latency_ms for e in fastest)
        if f_lat > lat_max * (1 + REL_TOL):
            at_least = "" if f_exact else "at least "
            msg = f"max_latency_ms_per_token {lat_max:g} binds: the fastest route takes {at_least}{f_lat:.6g} ms/token"
            binds.append(("max_latency", msg))
    if cost_max is not None and cheapest is not None:
        c_cost = sum(e.cost for e in cheapest)
        if c_cost > cost_max:
            at_least = "" if c_exact else "at least "
            msg = f"max_cost {cost_max} binds: the cheapest route costs {at_least}{c_cost} token units"
            msg += f" for {tokens} tokens"
            binds.append(("max_cost", msg))
    if len(binds) == 1:
        return NoRouteError(binds[0][1], constraint=binds[0][0])
    if binds:
        return NoRouteError("; ".join(msg for _, msg in binds), constraint="max_latency+max_cost")
    if proven and fastest is not None and cheapest is not None and lat_max is not None and cost_max is not None:
        return NoRouteError(
            f"max_latency_ms_per_token {lat_max:g} and max_cost {cost_max} bind together: the fastest route "
            f"({sum(e.latency_ms for e in fastest):.6g} ms/token) costs {sum(e.cost for e in fastest)} > {cost_max}, "
            f"the cheapest ({sum(e.cost for e in cheapest)} token units) takes "
            f"{sum(e.latency_ms for e in cheapest):.6g} ms/token > {lat_max:g}",
            constraint="max_latency+max_cost",
        )
    searched = "greedy search" if solver == "greedy" else f"ILP (limit {time_limit_s:g} s) and greedy search"
    limits = [f"max_latency_ms_per_token {lat_max:g}"] if lat_max is not None else []
    limits += [f"max_cost {cost_max}"] if cost_max is not None else []
    return NoRouteError(  # a heuristic gave up, yet no budget provably binds on its own
        f"the {searched} found no route within {' and '.join(limits) or 'the policy'}; the best route "
        f"without budgets takes {sum(e.latency_ms for e in free):.6g} ms/token and costs {sum(e.cost for e in free)}",
        constraint="solver",
    )


def _route(pb: RouteProblem, path: list[Edge], solver: SolverName, optimal: bool, t0: float) -> Route:
    hops = tuple(
        Hop(
            node_id=pb.offers[e.node].node_id,
            peer_id=pb.offers[e.node].peer_id,
            layers=LayerRange(start=e.start, end=e.end),
            compute_ms=e.compute_ms,
            transfer_ms=e.transfer_ms,
            failure_risk=e.risk,
            cost=e.cost,
        )
        for e in path
    )
    compute = sum(e.compute_ms for e in path)
    transfer = sum(e.transfer_ms for e in path)
    return Route(
        model_id=pb.state.model_id,
        hops=hops,
        compute_ms=compute,
        transfer_ms=transfer,
        latency_ms_per_token=compute + transfer,
        failure_risk=sum(e.risk for e in path),
        cost=sum(e.cost for e in path),
        objective=sum(e.objective for e in path),
        fallback=False,
        solver=solver,
        optimal=optimal,
        solve_time_ms=1000.0 * (time.perf_counter() - t0),
    )


def _fallback_route(pool: FallbackPool, pb: RouteProblem, reason: str, t0: float) -> Route | str:
    """The job on the fallback pool, or why the pool does not meet the policy either."""
    policy, tokens = pb.policy, pb.request.total_tokens
    latency = pool.compute_ms_per_token + pool.network_latency_ms
    cost = pool.price_per_token * tokens
    if policy.privacy == "high" and not pool.attestation_verified:
        return "the fallback pool has no verified attestation (privacy=high)"
    if policy.max_latency_ms_per_token is not None and latency > policy.max_latency_ms_per_token:
        return f"the fallback pool takes {latency:g} ms/token > max {policy.max_latency_ms_per_token:g}"
    if policy.max_cost is not None and cost > policy.max_cost:
        return f"the fallback pool costs {cost} > max_cost {policy.max_cost}"
    hop = Hop(
        node_id=pool.node_id,
        peer_id=pool.peer_id,
        layers=LayerRange(start=0, end=pb.num_layers),
        compute_ms=pool.compute_ms_per_token,
        transfer_ms=pool.network_latency_ms,
        failure_risk=pool.failure_risk,
        cost=cost,
    )
    return Route(
        model_id=pb.state.model_id,
        hops=(hop,),
        compute_ms=pool.compute_ms_per_token,
        transfer_ms=pool.network_latency_ms,
        latency_ms_per_token=latency,
        failure_risk=pool.failure_risk,
        cost=cost,
        objective=policy.weight_compute * pool.compute_ms_per_token
        + policy.weight_transfer * pool.network_latency_ms
        + policy.weight_risk * pool.failure_risk,
        fallback=True,
        fallback_reason=reason,
        solver="fallback",
        optimal=False,
        solve_time_ms=1000.0 * (time.perf_counter() - t0),
    )


def plan_route(
    state: NetworkState,
    request: RouteRequest,
    policy: Policy,
    fallback: FallbackPool | None = None,
    *,
    time_limit_s: float = 2.0,
    solver: Literal["ilp", "greedy"] = "ilp",
) -> Route:
    """The best route for ``request`` on ``state`` under ``policy``, or the fallback pool's.

    ``time_limit_s`` bounds the CBC solve (greedy takes over after it); explaining a failure may
    take one more such budget. ``solver="greedy"`` skips the ILP (baseline for benchmarks).
    Raises :class:`NoRouteError` when neither the network nor the fallback pool meets the policy.
    """
    t0 = time.perf_counter()
    if request.model_id != state.model_id:
        raise NoRouteError(
            f"the network state is for model {state.model_id}, the request for {request.model_id}",
            constraint="model",
        )
    pb = build_problem(state, request, policy)
    if fallback is not None and fallback.min_network_capacity_slots > 0:
        capacity = network_slots(pb)
        if capacity < fallback.min_network_capacity_slots:
            reason = f"network capacity {capacity} sessions < threshold {fallback.min_network_capacity_slots}"
            routed = _fallback_route(fallback, pb, reason, t0)
            if isinstance(routed, Route):
                return routed  # else the pool does not meet the policy: try the network anyway
    try:
        gaps = uncovered(pb)
        if gaps:
            raise _coverage_error(pb, gaps)
        path, used, optimal = solve(pb, solver, time_limit_s)
        if path is None:
            raise _diagnose(pb, time_limit_s, proven=optimal, solver=solver)
        return _route(pb, path, used, optimal, t0)
    except NoRouteError as exc:
        if fallback is None:
            raise
        routed = _fallback_route(fallback, pb, exc.reason, t0)
        if isinstance(routed, Route):
            return routed
        raise NoRouteError(f"{exc.reason}; {routed}", constraint=exc.constraint, uncovered=exc.uncovered) from exc
