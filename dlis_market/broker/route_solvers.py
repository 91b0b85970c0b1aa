"""How a route is found on a :class:`~dlis_market.broker.route_graph.RouteProblem`: the shortest
path when it meets every constraint, else CBC on the integer program with the greedy route as its
incumbent, else the greedy search (shortest paths with Lagrangian penalties on the budgets).

The model, and why these steps in this order, is :mod:`dlis_market.broker.scheduler`'s docstring;
that module builds the problem, explains failures (with :func:`min_route`) and falls back.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Literal

import pulp

from dlis_market.broker.network_state import SolverName
from dlis_market.broker.route_graph import (
    REL_TOL,
    Edge,
    RouteProblem,
    bounds,
    chain,
    merge_reuse,
    reused_nodes,
    shortest_path,
    violations,
)

_PENALTIES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0)  # greedy's Lagrange multipliers


_Status = Literal["optimal", "feasible", "infeasible", "unsolved"]


def _cbc(time_limit_s: float, *, warm_start: bool) -> pulp.LpSolver:
    # PuLP 3.3 deprecates the PULP_CBC_CMD class but still bundles its CBC binary: run that binary
    # through COIN_CMD. PuLP 4.0 drops both; COIN_CMD then finds CBC on PATH.
    # CBC's integer preprocessing and primal heuristics cost 2-3x the CPU on these programs and find
    # nothing the greedy incumbent and the near-integral flow LP do not (bench/scheduler_solve.py).
    bundled = getattr(getattr(pulp, "PULP_CBC_CMD", None), "pulp_cbc_path", None)
    return pulp.COIN_CMD(
        path=bundled,
        msg=False,
        timeLimit=max(time_limit_s, 0.01),
        threads=1,
        warmStart=warm_start,
        options=["preprocess off", "heur off"],
    )


def ilp(
    pb: RouteProblem,
    weights: list[float],
    *,
    budgets: bool,
    time_limit_s: float,
    incumbent: list[Edge] | None = None,
) -> tuple[_Status, list[Edge] | None]:
    """Solve the integer program with CBC, minimising ``weights`` (one per edge).

    Edges that cannot lie on a route within the budgets, or on a route better than ``incumbent``
    (a known feasible route, also CBC's starting solution), are left out first: every path through
    such an edge breaks the bound even without the coupling constraints, so the optimum stays and
    the program shrinks.
    """
    policy, num_layers = pb.policy, pb.num_layers
    keep = list(range(len(pb.edges)))
    lat, cost = policy.max_latency_ms_per_token, policy.max_cost
    if budgets and lat is not None:
        lat_bound = bounds(pb, [e.latency_ms for e in pb.edges])
        keep = [k for k in keep if lat_bound[k] <= lat * (1 + REL_TOL)]
    if budgets and cost is not None:
        costs = [e.cost for e in pb.edges]
        cost_bound = bounds(pb, costs)  # type: ignore[arg-type]  # ints: exact sums
        keep = [k for k in keep if cost_bound[k] <= cost]
    start = set(incumbent or ())
    if incumbent is not None:
        upper = sum(weights[k] for k, e in enumerate(pb.edges) if e in start)
        obj_bound = bounds(pb, weights)
        keep = [k for k in keep if obj_bound[k] <= upper + REL_TOL * max(1.0, abs(upper))]
    prob = pulp.LpProblem("route", pulp.LpMinimize)
    xs = {k: prob.add_variable(f"x{k}", cat=pulp.LpBinary) for k in keep}
    if incumbent is not None:
        for k in keep:
            xs[k].setInitialValue(1 if pb.edges[k] in start else 0)
    scale = max((abs(weights[k]) for k in keep), default=1.0) or 1.0  # costs as weights reach 1e20
    prob.setObjective(pulp.LpAffineExpression([(xs[k], weights[k] / scale) for k in keep]))
    flow: dict[int, list[tuple[pulp.LpVariable, int]]] = defaultdict(list)
    per_node: dict[str, list[pulp.LpVariable]] = defaultdict(list)
    for k in keep:
        e = pb.edges[k]
        flow[e.start].append((xs[k], 1))
        flow[e.end].append((xs[k], -1))
        per_node[pb.offers[e.node].node_id].append(xs[k])
    for b in range(num_layers + 1):
        rhs = 1 if b == 0 else -1 if b == num_layers else 0
        if not flow[b]:
            if rhs != 0:
                return "infeasible", None
            continue
        prob += pulp.LpConstraint(pulp.LpAffineExpression(flow[b]), pulp.LpConstraintEQ, f"flow{b}", rhs)
    for i, group in enumerate(per_node.values()):
        if len(group) > 1:
            prob += pulp.LpConstraint(pulp.lpSum(group), pulp.LpConstraintLE, f"once{i}", 1)
    if budgets and policy.max_latency_ms_per_token is not None:
        expr = pulp.LpAffineExpression([(xs[k], pb.edges[k].latency_ms) for k in keep])
        prob += pulp.LpConstraint(expr, pulp.LpConstraintLE, "latency", policy.max_latency_ms_per_token)
    if budgets and policy.max_cost is not None and policy.max_cost > 0:
        unit = policy.max_cost  # token units can reach 1e20; CBC works in doubles, so normalise to <= 1
        expr = pulp.LpAffineExpression([(xs[k], pb.edges[k].cost / unit) for k in keep])
        prob += pulp.LpConstraint(expr, pulp.LpConstraintLE, "cost", 1)
    try:
        prob.solve(_cbc(time_limit_s, warm_start=incumbent is not None))
    except pulp.PulpSolverError:  # CBC missing or crashed: the caller falls back to greedy
        return "unsolved", None
    if prob.status == pulp.LpStatusInfeasible:
        return "infeasible", None
    if prob.status != pulp.LpStatusOptimal:
        return "unsolved", None
    path = chain([pb.edges[k] for k in keep if (xs[k].varValue or 0.0) > 0.5], num_layers)
    if path is None:
        return "unsolved", None
    return ("optimal" if prob.sol_status == pulp.LpSolutionOptimal else "feasible"), path


def greedy_route(pb: RouteProblem) -> list[Edge] | None:
    """Best feasible route among shortest paths with growing penalties on the budgets.

    Each candidate path that reuses a node is repaired by merging the node's uses; what still breaks
    a constraint is dropped.
    """
    base = [e.objective for e in pb.edges]
    first = shortest_path(pb, base)
    if first is None:
        return None
    candidates = [first]
    lat, cost = pb.policy.max_latency_ms_per_token, pb.policy.max_cost
    if lat is not None or cost is not None:
        penalty = [
            (e.latency_ms / lat if lat is not None else 0.0) + (e.cost / max(cost, 1) if cost is not None else 0.0)
            for e in pb.edges
        ]
        scale = max(sum(e.objective for e in first), 1e-9)
        for lam in _PENALTIES[1:]:
            path = shortest_path(pb, [b + lam * scale * p for b, p in zip(base, penalty, strict=True)])
            if path is not None:
                candidates.append(path)
        tie = 1e-9 / scale
        pure = shortest_path(pb, [p + tie * b for b, p in zip(base, penalty, strict=True)])
        if pure is not None:
            candidates.append(pure)
    repaired = [merge_reuse(pb, p) for p in candidates]
    feasible = [p for p in repaired if not violations(pb, p)]
    return min(feasible, key=lambda p: sum(e.objective for e in p)) if feasible else None


def min_route(pb: RouteProblem, weights: list[float], deadline: float) -> tuple[list[Edge] | None, bool]:
    """Route minimising ``weights`` with each node once but no budgets; (route, proven exact)."""
    path = shortest_path(pb, weights)
    if path is None or not reused_nodes(pb, path):
        return path, True
    status, exact = ilp(pb, weights, budgets=False, time_limit_s=deadline - time.perf_counter())
    if status in ("optimal", "feasible"):
        return exact, status == "optimal"
    return (None, True) if status == "infeasible" else (path, False)  # DP path: a lower bound


def solve(
    pb: RouteProblem, solver: Literal["ilp", "greedy"], time_limit_s: float
) -> tuple[list[Edge] | None, SolverName, bool]:
    """``(route, solver used, proven)``: proven optimal, or with no route, proven infeasible."""
    if solver == "greedy":
        return greedy_route(pb), "greedy", False
    objective = [e.objective for e in pb.edges]
    relaxed = shortest_path(pb, objective)
    if relaxed is not None and not violations(pb, relaxed):
        return relaxed, "ilp", True  # the relaxation's optimum meets every constraint: it is the ILP's
    greedy = greedy_route(pb)  # an incumbent: its objective bounds which edges the ILP needs
    status, path = ilp(pb, objective, budgets=True, time_limit_s=time_limit_s, incumbent=greedy)
    if status == "infeasible":
        return None, "ilp", True
    if path is not None and not violations(pb, path):
        if status == "optimal":
            return path, "ilp", True
        if greedy is not None and sum(e.objective for e in greedy) < sum(e.objective for e in path):
            return greedy, "greedy", False  # CBC stopped at the time limit with a worse incumbent
        return path, "ilp", False
    return greedy, "greedy", False  # CBC failed or stopped without a solution
