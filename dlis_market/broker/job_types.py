"""The broker's job vocabulary: planned routes, admission tickets (held job and worker slots),
priced jobs, idempotency keys, the planner's signature, and the pure checks on offers and receipts
that admission and recording share. No I/O."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dlis_market.broker.catalog import ServedModel
from dlis_market.broker.errors import UpstreamFailed, incomplete_receipts
from dlis_market.broker.schemas import Policy
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spans import SpanRecord, missing_layers


@dataclass(frozen=True)
class PlannedRoute:
    hops: list[RouteHop]
    estimated_latency_ms: float
    fallback: bool = False
    # privacy=high: the first ``shares`` hops serve the first stage together, each on one secret
    # share of its activations (node/private_entry.py); the route goes on from their end
    shares: int = 0


@dataclass
class AdmissionTicket:
    """A held job slot and the workers' KV-cache slots reserved for a planned route until its
    backend session opens, and the route's workers counted against their share per opener until
    the job ends (:meth:`BrokerService._release` gives each back, once)."""

    peers: list[str]
    since: float = field(default_factory=time.monotonic)
    holding: list[str] = field(default_factory=list)  # peers counted in the broker's sessions there, until the job ends
    slot_held: bool = True


@dataclass(frozen=True)
class PricedJob:
    """A job's prompt, route and cost bound, before it is admitted. ``ticket``: the job slot and
    worker slots held for it (priced with ``admit=True``), released by :meth:`BrokerService.submit`."""

    served: ServedModel
    prompt_ids: list[int]
    route: PlannedRoute
    cost: int
    fee: int
    ticket: AdmissionTicket | None = None

    @property
    def total(self) -> int:
        return self.cost + self.fee


@dataclass(frozen=True)
class Idempotency:
    """A request's idempotency key and body hash; ``scope`` (the client address, or the API key's
    hash) is filled in once the request's client is proven."""

    key: str
    body_hash: str
    scope: str | None = None
    replay: bool = True  # False: only record the admission (a first try whose key is derived)


# (offers, model, policy, prompt tokens, max new tokens, fee bps) -> route; the policy's max_cost is
# a total with the fee (``protocol.pricing``).
Planner = Callable[[list[SpanRecord], ServedModel, Policy, int, int, int], PlannedRoute]


def covers(offers: list[SpanRecord], num_layers: int) -> bool:
    """Whether the offers' spans together cover layers [0, num_layers)."""
    return not missing_layers(offers, 0, num_layers)


def covering_receipts(receipts: list[StageReceipt], num_layers: int) -> list[StageReceipt]:
    """The receipts of the final route, tiling [0, num_layers) in order (a replaced stage's
    partial receipt is dropped: JobMarket pays one receipt per layer range, or one per member of
    a group sharing it). A privacy=high job's share receipts come first, one per node, in
    ascending node address (JobMarket's order for a range's group)."""
    by_start: dict[int, StageReceipt] = {}
    shares: dict[int, StageReceipt] = {}  # node -> its share receipt
    for r in receipts:  # later receipts (after a failover) replace earlier ones for the same start
        if r.share:
            shares[int(r.node, 16)] = r
        else:
            by_start[r.start] = r
    out = [shares[node] for node in sorted(shares)]
    at = 0
    if out:  # one is paid too: a share worker that withheld its receipt forfeits only its own pay
        ranges = {(r.start, r.end) for r in out}
        if len(ranges) != 1 or out[0].start != 0:
            raise UpstreamFailed(
                f"the share receipts of the private first stage are over {sorted(ranges)}: one range [0, e) is paid",
                kind="incomplete-receipts",
                title="Incomplete receipts",
            )
        at = out[0].end
    while at < num_layers:
        nxt = by_start.get(at)
        if nxt is None:
            raise incomplete_receipts(at)
        out.append(nxt)
        at = nxt.end
    return out
