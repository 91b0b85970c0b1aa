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
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Literal

import pulp

from dlis_market.broker.network_state import (
    FallbackPool,
    Hop,
    NetworkState,
    NodeOffer,
    Policy,
    Route,
    RouteRequest,
    SolverName,
)
from dlis_market.errors import BrokerError
from dlis_market.types import LayerRange

Constraint = Literal["model", "coverage", "node_capacity", "max_latency", "max_cost", "max_latency+max_cost", "solver"]

_REL_TOL = 1e-9  # slack allowed on the float latency budget when a route is checked exactly
_PENALTIES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0)  # greedy's Lagrange multipliers


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


@dataclass(frozen=True, slots=True)
class _Edge:
    node: int  # index into _Problem.offers
    start: int
    end: int
    compute_ms: float
    transfer_ms: float
    risk: float
    cost: int
    objective: float

    @property
    def latency_ms(self) -> float:
        return self.compute_ms + self.transfer_ms


@dataclass(slots=True)
class _Problem:
    state: NetworkState
    request: RouteRequest
    policy: Policy
    offers: list[NodeOffer]  # eligible
    excluded: list[tuple[NodeOffer, str, str]]  # offers of this model filtered out: (offer, kind, detail)
    layer_caps: list[int]  # most layers each eligible offer can hold for this job
    edges: list[_Edge]
    by_end: list[list[int]]  # indices of the edges ending at each boundary
    by_start: list[list[int]]  # indices of the edges starting at each boundary

    @property
    def num_layers(self) -> int:
        return self.state.num_layers


def _exclusion(offer: NodeOffer, state: NetworkState, request: RouteRequest, policy: Policy) -> tuple[str, str] | None:
    """``(kind, detail)`` when ``offer`` may not serve this job, else None."""
    if offer.served.end > state.num_layers:
        return "range", f"serves {offer.served} beyond the model's {state.num_layers} layers"
    if not offer.stake_ok:
        return "unstaked", "not staked (or slashed below the minimum)"
    if offer.reputation_bps < policy.min_reputation_bps:
        return "reputation", f"reputation {offer.reputation_bps} bps < min {policy.min_reputation_bps} bps"
    if policy.privacy == "high" and not offer.attestation_verified:
        return "unattested", "no verified attestation (privacy=high)"
    if offer.free_kv_slots < 1:
        return "kv_slots", "no free KV-cache slot"
    need = request.total_tokens * offer.kv_bytes_per_token_layer
    if need > offer.free_memory_bytes:
        return "memory", (
            f"{offer.free_memory_bytes} B free < {need} B of KV cache for one layer of {request.total_tokens} tokens"
        )
    return None


def _spans(offer: NodeOffer, cap: int) -> list[tuple[int, int]]:
    """Sub-ranges [i, j) the offer can serve: any within its span whose KV fits (``cap`` layers),
    or only the whole span for a worker that runs its shard as one stage."""
    start, end = offer.served.start, offer.served.end
    if not offer.splittable:
        return [(start, end)] if cap >= end - start else []
    return [(i, j) for i in range(start, end) for j in range(i + 1, min(end, i + cap) + 1)]


def _build(state: NetworkState, request: RouteRequest, policy: Policy) -> _Problem:
    tokens = request.total_tokens
    offers: list[NodeOffer] = []
    excluded: list[tuple[NodeOffer, str, str]] = []
    caps: list[int] = []
    edges: list[_Edge] = []
    for offer in state.offers:
        if offer.model_id != state.model_id:
            continue
        why = _exclusion(offer, state, request, policy)
        if why is not None:
            excluded.append((offer, *why))
            continue
        per_layer = tokens * offer.kv_bytes_per_token_layer
        cap = offer.served.size if per_layer == 0 else min(offer.served.size, offer.free_memory_bytes // per_layer)
        node = len(offers)
        offers.append(offer)
        caps.append(cap)
        transfer = offer.network_latency_ms + 1000.0 * state.activation_bytes_per_token / offer.bandwidth_bytes_per_s
        risk_term = policy.weight_transfer * transfer + policy.weight_risk * offer.failure_risk
        for i, j in _spans(offer, cap):
            compute = offer.compute_ms_per_layer * (j - i)
            edges.append(
                _Edge(
                    node=node,
                    start=i,
                    end=j,
                    compute_ms=compute,
                    transfer_ms=transfer,
                    risk=offer.failure_risk,
                    cost=offer.price_per_token_layer * (j - i) * tokens,
                    objective=policy.weight_compute * compute + risk_term,
                )
            )
    by_end: list[list[int]] = [[] for _ in range(state.num_layers + 1)]
    by_start: list[list[int]] = [[] for _ in range(state.num_layers + 1)]
    for k, e in enumerate(edges):
        by_end[e.end].append(k)
        by_start[e.start].append(k)
    return _Problem(state, request, policy, offers, excluded, caps, edges, by_end, by_start)


def network_capacity(state: NetworkState, request: RouteRequest, policy: Policy) -> int:
    """Sessions like this one the network could hold at once: min over layers of free KV slots.

    Counts only offers eligible under ``policy``; an upper bound (a session takes one slot on
    some node at every layer), and 0 when a layer is uncovered.
    """
    return _capacity(_build(state, request, policy))


def _capacity(pb: _Problem) -> int:
    slots = [0] * pb.num_layers
    for offer, cap in zip(pb.offers, pb.layer_caps, strict=True):
        if cap >= 1:
            for layer in range(offer.served.start, offer.served.end):
                slots[layer] += offer.free_kv_slots
    return min(slots)


def _uncovered(pb: _Problem) -> tuple[LayerRange, ...]:
    covered = [False] * pb.num_layers
    for offer in pb.offers:
        for layer in range(offer.served.start, offer.served.end):
            covered[layer] = True
    gaps: list[LayerRange] = []
    layer = 0
    while layer < pb.num_layers:
        if covered[layer]:
            layer += 1
            continue
        end = layer
        while end < pb.num_layers and not covered[end]:
            end += 1
        gaps.append(LayerRange(start=layer, end=end))
        layer = end
    return tuple(gaps)


def _coverage_error(pb: _Problem, gaps: tuple[LayerRange, ...]) -> NoRouteError:
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


def _reused(pb: _Problem, path: list[_Edge]) -> list[str]:
    """Node ids ``path`` uses more than once."""
    return [n for n, k in Counter(pb.offers[e.node].node_id for e in path).items() if k > 1]


def _violations(pb: _Problem, path: list[_Edge]) -> list[str]:
    """Every constraint ``path`` breaks, checked exactly (integers for cost)."""
    out = []
    reused = _reused(pb, path)
    if reused:
        out.append(f"nodes used twice: {', '.join(reused)}")
    limit = pb.policy.max_latency_ms_per_token
    latency = sum(e.latency_ms for e in path)
    if limit is not None and latency > limit * (1 + _REL_TOL):
        out.append(f"latency {latency:.6g} ms/token > max {limit:g}")
    cost = sum(e.cost for e in path)
    if pb.policy.max_cost is not None and cost > pb.policy.max_cost:
        out.append(f"cost {cost} > max {pb.policy.max_cost}")
    return out


def _chain(chosen: list[_Edge], num_layers: int) -> list[_Edge] | None:
    """The chosen edges as a path 0 -> L, or None if they are not exactly one."""
    by_start = {e.start: e for e in chosen}
    path, at = [], 0
    while at < num_layers and at in by_start:
        path.append(by_start[at])
        at = by_start[at].end
    return path if at == num_layers and len(path) == len(chosen) else None


_Status = Literal["optimal", "feasible", "infeasible", "unsolved"]


def _bounds(pb: _Problem, weights: list[float]) -> list[float]:
    """For each edge, the least total weight of any path 0 -> L through it (coupling ignored)."""
    num_layers, inf = pb.num_layers, float("inf")
    to = [inf] * (num_layers + 1)  # least weight 0 -> boundary
    to[0] = 0.0
    for j in range(1, num_layers + 1):
        to[j] = min((to[pb.edges[k].start] + weights[k] for k in pb.by_end[j]), default=inf)
    rest = [inf] * (num_layers + 1)  # least weight boundary -> L
    rest[num_layers] = 0.0
    for i in range(num_layers - 1, -1, -1):
        rest[i] = min((weights[k] + rest[pb.edges[k].end] for k in pb.by_start[i]), default=inf)
    return [to[e.start] + w + rest[e.end] for e, w in zip(pb.edges, weights, strict=True)]


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


def _ilp(
    pb: _Problem,
    weights: list[float],
    *,
    budgets: bool,
    time_limit_s: float,
    incumbent: list[_Edge] | None = None,
) -> tuple[_Status, list[_Edge] | None]:
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
        lat_bound = _bounds(pb, [e.latency_ms for e in pb.edges])
        keep = [k for k in keep if lat_bound[k] <= lat * (1 + _REL_TOL)]
    if budgets and cost is not None:
        costs = [e.cost for e in pb.edges]
        cost_bound = _bounds(pb, costs)  # type: ignore[arg-type]  # ints: exact sums
        keep = [k for k in keep if cost_bound[k] <= cost]
    start = set(incumbent or ())
    if incumbent is not None:
        upper = sum(weights[k] for k, e in enumerate(pb.edges) if e in start)
        obj_bound = _bounds(pb, weights)
        keep = [k for k in keep if obj_bound[k] <= upper + _REL_TOL * max(1.0, abs(upper))]
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
    path = _chain([pb.edges[k] for k in keep if (xs[k].varValue or 0.0) > 0.5], num_layers)
    if path is None:
        return "unsolved", None
    return ("optimal" if prob.sol_status == pulp.LpSolutionOptimal else "feasible"), path


def _shortest_path(pb: _Problem, weights: list[float]) -> list[_Edge] | None:
    """Cheapest path 0 -> L under ``weights`` by dynamic programming; ignores coupling constraints."""
    num_layers = pb.num_layers
    best = [float("inf")] * (num_layers + 1)
    pred = [-1] * (num_layers + 1)
    best[0] = 0.0
    for j in range(1, num_layers + 1):
        for k in pb.by_end[j]:
            c = best[pb.edges[k].start] + weights[k]
            if c < best[j]:
                best[j], pred[j] = c, k
    if pred[num_layers] < 0:
        return None
    path, at = [], num_layers
    while at > 0:  # every boundary reached has a predecessor edge
        path.append(pb.edges[pred[at]])
        at = path[-1].start
    return path[::-1]


def _merge_reuse(pb: _Problem, path: list[_Edge]) -> list[_Edge]:
    """``path`` with each reused node's first..last use merged into one hop, where its memory allows.

    The hops in between are dropped, so no other node gains a second use.
    """
    while reused := _reused(pb, path):
        node = next(e.node for e in path if pb.offers[e.node].node_id == reused[0])
        first = next(i for i, e in enumerate(path) if e.node == node)
        last = max(i for i, e in enumerate(path) if e.node == node)
        if first == last:  # two offers of one node id: nothing to merge, the path stays infeasible
            return path
        start, end = path[first].start, path[last].end
        merged = next(
            (pb.edges[k] for k in pb.by_start[start] if pb.edges[k].node == node and pb.edges[k].end == end), None
        )
        if merged is None:  # the node cannot hold [start, end): leave the path as it is
            return path
        path = [*path[:first], merged, *path[last + 1 :]]
    return path


def _greedy(pb: _Problem) -> list[_Edge] | None:
    """Best feasible route among shortest paths with growing penalties on the budgets.

    Each candidate path that reuses a node is repaired by merging the node's uses; what still breaks
    a constraint is dropped.
    """
    base = [e.objective for e in pb.edges]
    first = _shortest_path(pb, base)
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
            path = _shortest_path(pb, [b + lam * scale * p for b, p in zip(base, penalty, strict=True)])
            if path is not None:
                candidates.append(path)
        tie = 1e-9 / scale
        pure = _shortest_path(pb, [p + tie * b for b, p in zip(base, penalty, strict=True)])
        if pure is not None:
            candidates.append(pure)
    repaired = [_merge_reuse(pb, p) for p in candidates]
    feasible = [p for p in repaired if not _violations(pb, p)]
    return min(feasible, key=lambda p: sum(e.objective for e in p)) if feasible else None


def _min_route(pb: _Problem, weights: list[float], deadline: float) -> tuple[list[_Edge] | None, bool]:
    """Route minimising ``weights`` with each node once but no budgets; (route, proven exact)."""
    path = _shortest_path(pb, weights)
    if path is None or not _reused(pb, path):
        return path, True
    status, exact = _ilp(pb, weights, budgets=False, time_limit_s=deadline - time.perf_counter())
    if status in ("optimal", "feasible"):
        return exact, status == "optimal"
    return (None, True) if status == "infeasible" else (path, False)  # DP path: a lower bound


def _diagnose(pb: _Problem, time_limit_s: float, *, proven: bool, solver: str) -> NoRouteError:
    """Why no route exists: node capacity, or which budget binds and by how much.

    ``proven``: the ILP showed that no route meets the policy (else a heuristic just found none).
    """
    deadline = time.perf_counter() + time_limit_s
    policy, tokens = pb.policy, pb.request.total_tokens
    free, _ = _min_route(pb, [e.objective for e in pb.edges], deadline)
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
        _min_route(pb, [e.latency_ms for e in pb.edges], deadline) if lat_max is not None else (None, False)
    )
    cheapest, c_exact = (
        _min_route(pb, [float(e.cost) for e in pb.edges], deadline) if cost_max is not None else (None, False)
    )
    binds: list[tuple[Constraint, str]] = []
    if lat_max is not None and fastest is not None:
        f_lat = sum(e.latency_ms for e in fastest)
        if f_lat > lat_max * (1 + _REL_TOL):
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


def _solve(
    pb: _Problem, solver: Literal["ilp", "greedy"], time_limit_s: float
) -> tuple[list[_Edge] | None, SolverName, bool]:
    """``(route, solver used, proven)``: proven optimal, or with no route, proven infeasible."""
    if solver == "greedy":
        return _greedy(pb), "greedy", False
    objective = [e.objective for e in pb.edges]
    relaxed = _shortest_path(pb, objective)
    if relaxed is not None and not _violations(pb, relaxed):
        return relaxed, "ilp", True  # the relaxation's optimum meets every constraint: it is the ILP's
    greedy = _greedy(pb)  # an incumbent: its objective bounds which edges the ILP needs
    status, path = _ilp(pb, objective, budgets=True, time_limit_s=time_limit_s, incumbent=greedy)
    if status == "infeasible":
        return None, "ilp", True
    if path is not None and not _violations(pb, path):
        if status == "optimal":
            return path, "ilp", True
        if greedy is not None and sum(e.objective for e in greedy) < sum(e.objective for e in path):
            return greedy, "greedy", False  # CBC stopped at the time limit with a worse incumbent
        return path, "ilp", False
    return greedy, "greedy", False  # CBC failed or stopped without a solution


def _route(pb: _Problem, path: list[_Edge], solver: SolverName, optimal: bool, t0: float) -> Route:
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


def _fallback_route(pool: FallbackPool, pb: _Problem, reason: str, t0: float) -> Route | str:
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
    pb = _build(state, request, policy)
    if fallback is not None and fallback.min_network_capacity_slots > 0:
        capacity = _capacity(pb)
        if capacity < fallback.min_network_capacity_slots:
            reason = f"network capacity {capacity} sessions < threshold {fallback.min_network_capacity_slots}"
            routed = _fallback_route(fallback, pb, reason, t0)
            if isinstance(routed, Route):
                return routed  # else the pool does not meet the policy: try the network anyway
    try:
        gaps = _uncovered(pb)
        if gaps:
            raise _coverage_error(pb, gaps)
        path, used, optimal = _solve(pb, solver, time_limit_s)
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
