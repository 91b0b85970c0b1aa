"""Route choice over announced spans: pure functions, no I/O.

A route is a chain of spans whose ranges tile ``[start, end)``. :func:`plan_route` finds the
cheapest one with Dijkstra over layer boundaries, an edge per live span; an edge costs the
span's time per token (1 / throughput) plus one network hop. Banned peers and full peers are
left out. The broker's ILP scheduler can replace this choice: the driver takes any route.
:func:`choose_range` is the worker's ``--auto`` choice: the candidate range whose weakest layer
has the least total throughput in the swarm (Petals' block selection).
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Sequence

from dlis_market.node.errors import NoRouteError
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spans import SpanRecord, missing_layers
from dlis_market.types import LayerRange

DEFAULT_HOP_S = 0.001


def usable(spans: Sequence[SpanRecord], banned: Collection[str]) -> list[SpanRecord]:
    return [s for s in spans if s.online and s.free_slots > 0 and s.peer_id not in banned]


def plan_route(
    spans: Sequence[SpanRecord],
    start: int,
    end: int,
    banned: Collection[str] = (),
    hop_s: dict[str, float] | None = None,
) -> list[RouteHop]:
    """Cheapest chain of usable spans tiling ``[start, end)``; NoRouteError names what is missing."""
    live = usable(spans, banned)
    hop_s = hop_s or {}
    dist: dict[int, float] = {start: 0.0}
    prev: dict[int, SpanRecord] = {}
    heap: list[tuple[float, int]] = [(0.0, start)]
    while heap:
        d, at = heapq.heappop(heap)
        if at == end:
            break
        if d > dist.get(at, float("inf")):
            continue
        for s in live:
            if s.start != at or s.end > end:
                continue
            cost = d + 1.0 / max(s.throughput, 1e-9) + hop_s.get(s.peer_id, DEFAULT_HOP_S)
            if cost < dist.get(s.end, float("inf")):
                dist[s.end] = cost
                prev[s.end] = s
                heapq.heappush(heap, (cost, s.end))
    if end not in prev:
        gaps = missing_layers(live, start, end)
        if gaps:
            text = ", ".join(f"[{a}, {b})" for a, b in gaps)
            raise NoRouteError(
                f"no live peer serves layers {text} of [{start}, {end}) "
                f"({len(spans)} spans announced, {len(banned)} peers banned); start a worker for them",
                gaps,
            )
        raise NoRouteError(
            f"layers [{start}, {end}) are covered but no chain of spans starts at {start} and ends at {end} "
            "exactly; workers must serve the manifest's ranges",
        )
    route: list[RouteHop] = []
    at = end
    while at != start:
        s = prev[at]
        route.append(RouteHop.of(s))
        at = s.start
    return route[::-1]


def choose_range(spans: Sequence[SpanRecord], candidates: Sequence[LayerRange]) -> LayerRange:
    """The candidate whose least-served layer has the lowest total throughput (ties: the first)."""
    if not candidates:
        raise NoRouteError("no candidate layer ranges to choose from; the manifest lists no stages")

    def weakest(r: LayerRange) -> float:
        return min(
            sum(s.throughput for s in spans if s.online and s.start <= layer < s.end) for layer in range(r.start, r.end)
        )

    return min(candidates, key=weakest)
