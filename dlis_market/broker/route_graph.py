"""The scheduler's graph: which offers may serve a job, the edges of the layer DAG, and exact
checks and shortest paths over it (the pure building blocks of :mod:`scheduler`).

Layer boundaries ``0..L`` are the vertices; an :class:`Edge` ``(node, i -> j)`` means "this node
serves layers ``[i, j)`` for this job" and carries its compute, transfer, failure risk, cost and
objective. :func:`build_problem` filters offers (model, range, stake, reputation, attestation, KV
slots, memory) and builds the edges; :func:`violations` checks a path exactly against the budgets.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from dlis_market.broker.network_state import NetworkState, NodeOffer, Policy, RouteRequest
from dlis_market.protocol.pricing import stage_charge
from dlis_market.types import LayerRange

REL_TOL = 1e-9  # slack allowed on the float latency budget when a route is checked exactly


@dataclass(frozen=True, slots=True)
class Edge:
    node: int  # index into RouteProblem.offers
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
class RouteProblem:
    state: NetworkState
    request: RouteRequest
    policy: Policy
    offers: list[NodeOffer]  # eligible
    excluded: list[tuple[NodeOffer, str, str]]  # offers of this model filtered out: (offer, kind, detail)
    layer_caps: list[int]  # most layers each eligible offer can hold for this job
    edges: list[Edge]
    by_end: list[list[int]]  # indices of the edges ending at each boundary
    by_start: list[list[int]]  # indices of the edges starting at each boundary

    @property
    def num_layers(self) -> int:
        return self.state.num_layers


def exclusion(offer: NodeOffer, state: NetworkState, request: RouteRequest, policy: Policy) -> tuple[str, str] | None:
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


def spans(offer: NodeOffer, cap: int) -> list[tuple[int, int]]:
    """Sub-ranges [i, j) the offer can serve: any within its span whose KV fits (``cap`` layers),
    or only the whole span for a worker that runs its shard as one stage."""
    start, end = offer.served.start, offer.served.end
    if not offer.splittable:
        return [(start, end)] if cap >= end - start else []
    return [(i, j) for i in range(start, end) for j in range(i + 1, min(end, i + cap) + 1)]


def edge_cost(offer: NodeOffer, i: int, j: int, tokens: int) -> int:
    """What a hop over [i, j) of ``offer`` may bill for ``tokens`` tokens: the offer's whole-span
    price when the hop is its whole span, else its per-layer price times the layers."""
    if offer.price_per_token is not None and (i, j) == (offer.served.start, offer.served.end):
        return stage_charge(offer.price_per_token, tokens)
    return stage_charge(offer.price_per_token_layer * (j - i), tokens)


def build_problem(state: NetworkState, request: RouteRequest, policy: Policy) -> RouteProblem:
    tokens = request.total_tokens
    offers: list[NodeOffer] = []
    excluded: list[tuple[NodeOffer, str, str]] = []
    caps: list[int] = []
    edges: list[Edge] = []
    for offer in state.offers:
        if offer.model_id != state.model_id:
            continue
        why = exclusion(offer, state, request, policy)
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
        for i, j in spans(offer, cap):
            compute = offer.compute_ms_per_layer * (j - i)
            edges.append(
                Edge(
                    node=node,
                    start=i,
                    end=j,
                    compute_ms=compute,
                    transfer_ms=transfer,
                    risk=offer.failure_risk,
                    cost=edge_cost(offer, i, j, tokens),
                    objective=policy.weight_compute * compute + risk_term,
                )
            )
    by_end: list[list[int]] = [[] for _ in range(state.num_layers + 1)]
    by_start: list[list[int]] = [[] for _ in range(state.num_layers + 1)]
    for k, e in enumerate(edges):
        by_end[e.end].append(k)
        by_start[e.start].append(k)
    return RouteProblem(state, request, policy, offers, excluded, caps, edges, by_end, by_start)


def capacity(pb: RouteProblem) -> int:
    slots = [0] * pb.num_layers
    for offer, cap in zip(pb.offers, pb.layer_caps, strict=True):
        if cap >= 1:
            for layer in range(offer.served.start, offer.served.end):
                slots[layer] += offer.free_kv_slots
    return min(slots)


def uncovered(pb: RouteProblem) -> tuple[LayerRange, ...]:
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


def reused_nodes(pb: RouteProblem, path: list[Edge]) -> list[str]:
    """Node ids ``path`` uses more than once."""
    return [n for n, k in Counter(pb.offers[e.node].node_id for e in path).items() if k > 1]


def violations(pb: RouteProblem, path: list[Edge]) -> list[str]:
    """Every constraint ``path`` breaks, checked exactly (integers for cost)."""
    out = []
    reused = reused_nodes(pb, path)
    if reused:
        out.append(f"nodes used twice: {', '.join(reused)}")
    limit = pb.policy.max_latency_ms_per_token
    latency = sum(e.latency_ms for e in path)
    if limit is not None and latency > limit * (1 + REL_TOL):
        out.append(f"latency {latency:.6g} ms/token > max {limit:g}")
    cost = sum(e.cost for e in path)
    if pb.policy.max_cost is not None and cost > pb.policy.max_cost:
        out.append(f"cost {cost} > max {pb.policy.max_cost}")
    return out


def chain(chosen: list[Edge], num_layers: int) -> list[Edge] | None:
    """The chosen edges as a path 0 -> L, or None if they are not exactly one."""
    by_start = {e.start: e for e in chosen}
    path, at = [], 0
    while at < num_layers and at in by_start:
        path.append(by_start[at])
        at = by_start[at].end
    return path if at == num_layers and len(path) == len(chosen) else None


def bounds(pb: RouteProblem, weights: list[float]) -> list[float]:
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


def shortest_path(pb: RouteProblem, weights: list[float]) -> list[Edge] | None:
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


def merge_reuse(pb: RouteProblem, path: list[Edge]) -> list[Edge]:
    """``path`` with each reused node's first..last use merged into one hop, where its memory allows.

    The hops in between are dropped, so no other node gains a second use.
    """
    while reused := reused_nodes(pb, path):
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
