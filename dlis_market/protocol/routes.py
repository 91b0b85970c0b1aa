"""A job's route as every party sees it: the hops the broker plans, the driver opens sessions
along, receipts are checked against and observations and spot checks name.

One type for one idea: a hop is the worker (its libp2p peer id and the node address that signs
its receipts) and the layers ``[start, end)`` it runs, at the price per token of the signed span
record the route was planned on (the most its receipt may bill per token, see
:func:`dlis_market.protocol.pricing.stage_charge`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from dlis_market.protocol.spans import SpanRecord


@dataclass(frozen=True)
class RouteHop:
    """One stage of a job's route."""

    peer_id: str
    node: str  # the node address: signs the stage's receipts, is paid and reputed
    start: int
    end: int
    price_per_token: int

    @classmethod
    def of(cls, span: SpanRecord) -> RouteHop:
        """The hop over a worker's whole announced span, at its announced price."""
        return cls(span.peer_id, span.node_address, span.start, span.end, span.price_per_token)


def route_record(hops: Sequence[RouteHop]) -> list[dict[str, str | int]]:
    """A route as the broker's ledger and API keep it (JSON): each hop's node, peer and layers."""
    return [{"node": h.node, "peer_id": h.peer_id, "start": h.start, "end": h.end} for h in hops]


# The broker's router for failovers, as the driver calls it: (the route so far, peer ids to avoid)
# -> a new route under the job's policy and max cost (dlis_market/broker/service.py).
Replan = Callable[[Sequence[RouteHop], frozenset[str]], Awaitable[Sequence[RouteHop]]]
