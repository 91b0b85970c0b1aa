"""From what workers announce to a route: the I/O around the pure scheduler.

Each announced span becomes a :class:`NodeOffer` enriched with what the chain says (routable =
registered with enough stake, reputation from ReputationOracle, attestation hash registered in
NodeRegistry equal to the announced one) and the oracle's failure risk; then
:func:`scheduler.plan_route` picks the route. A worker runs its shard as one stage, so spans are
offered whole (``splittable=False``). When a fallback worker (one peer serving the whole model) is
configured, it is taken out of the peer offers and used only as the scheduler's fallback pool.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dlis_market.broker import scheduler
from dlis_market.broker.catalog import ServedModel
from dlis_market.broker.job_types import PlannedRoute
from dlis_market.broker.network_state import FallbackPool, NetworkState, NodeOffer, RouteRequest
from dlis_market.broker.network_state import Policy as SchedulerPolicy
from dlis_market.broker.problems import no_route
from dlis_market.broker.schemas import Policy
from dlis_market.chain.node_registry import NodeRegistry
from dlis_market.chain.reputation_oracle import ReputationOracle
from dlis_market.protocol.pricing import cost_budget
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spans import SpanRecord
from dlis_market.settings import BrokerSettings
from dlis_market.types import LayerRange, ModelId, NodeId, PeerId

log = logging.getLogger(__name__)

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "int8": 2, "nf4": 2}  # activations travel as fp32/bf16


@dataclass(frozen=True)
class NodeStanding:
    routable: bool
    reputation_bps: int
    attestation_hash: str  # 0x-hex as registered on chain
    operator: str = ""  # the operator account that registered it (empty: unknown)

    def attests(self, announced: str) -> bool:
        """Whether the node registered an attestation and ``announced`` (its span's) is that one."""
        return self.attestation_hash == announced and int(self.attestation_hash, 16) != 0


StandingLookup = Callable[[str], NodeStanding]
RiskLookup = Callable[[str], float]


class CachedStanding:
    """Chain lookups of a node's standing, cached for ``ttl_s`` (routing runs per job, in worker
    threads). One read per node at a time: callers that find no value wait for the one read under
    way; once a value expires, one caller refreshes it and the others keep the last value
    meanwhile, so a refresh never costs a burst of chain reads or stalls the jobs planned then."""

    def __init__(self, lookup: StandingLookup, ttl_s: float = 10.0):
        self.lookup = lookup
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, NodeStanding]] = {}
        self._reads: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def __call__(self, node: str) -> NodeStanding:
        hit = self._cache.get(node)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        with self._guard:
            read = self._reads.setdefault(node, threading.Lock())
        if hit is not None and not read.acquire(blocking=False):
            return hit[1]  # expired, and another caller is reading it again now
        if hit is None:
            read.acquire()
        try:
            again = self._cache.get(node)
            if again is not None and again is not hit:
                return again[1]  # read meanwhile, by the caller we waited for
            value = self.lookup(node)
            self._cache[node] = (time.monotonic(), value)
            return value
        finally:
            read.release()


def chain_standing(registry: NodeRegistry, reputation: ReputationOracle) -> StandingLookup:
    """Standing from NodeRegistry + ReputationOracle bindings (unscored nodes count as 10000 bps)."""

    def lookup(node: str) -> NodeStanding:
        rec = registry.get(node)
        if rec is None:
            return NodeStanding(False, 0, "0x" + "00" * 32)
        score, epoch = reputation.latest(node)
        return NodeStanding(rec.routable, score if epoch else 10_000, "0x" + rec.attestation_hash.hex(), rec.operator)

    return lookup


class OracleRisk:
    """Failure risk per node from the oracle's ``GET /v1/nodes`` (dropout model), cached for
    ``ttl_s``; nodes the oracle has not heard from, or an unreachable oracle, get ``default``."""

    def __init__(self, url: str, default: float, ttl_s: float = 10.0, timeout_s: float = 2.0):
        self.url = url.rstrip("/")
        self.default = default
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._at = -1e18
        self._risk: dict[str, float] = {}

    def __call__(self, node: str) -> float:
        now = time.monotonic()
        if now - self._at >= self.ttl_s:
            import httpx

            try:
                data = httpx.get(f"{self.url}/v1/nodes", timeout=self.timeout_s).json()
                self._risk = {k.lower(): float(v["failure_risk"]) for k, v in data.items()}
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                log.warning("oracle at %s unavailable; using the default failure risk %.3f", self.url, self.default)
                self._risk = {}
            self._at = now
        return self._risk.get(node.lower(), self.default)


def kv_bytes_per_token_layer(served: ServedModel) -> int:
    cfg = served.manifest.config
    heads = int(cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    head_dim = int(
        cfg.get("head_dim") or hidden // max(int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1), 1)
    )
    return 2 * heads * head_dim * DTYPE_BYTES[served.manifest.dtype]


def make_planner(
    settings: BrokerSettings, standing: StandingLookup, risk: RiskLookup | None = None
) -> Callable[..., PlannedRoute]:
    def plan(
        offers: list[SpanRecord],
        served: ServedModel,
        policy: Policy,
        prompt_tokens: int,
        max_tokens: int,
        fee_bps: int = 0,
    ) -> PlannedRoute:
        """The scheduler's route for the job; ``policy.max_cost`` is a total with the protocol fee
        at ``fee_bps``, so the scheduler bounds the stages' charges by ``pricing.cost_budget``."""
        entry_end = served.manifest.stages[0].layers.end
        if policy.privacy == "high":  # the first stage runs on shares: it must be one hop, exactly that stage
            offers = [o for o in offers if o.start >= entry_end or (o.start, o.end) == (0, entry_end)]
        fallback_offer = next(
            (o for o in offers if settings.fallback_peer_id and o.peer_id == settings.fallback_peer_id), None
        )
        peers = [o for o in offers if o is not fallback_offer]
        node_offers = []
        by_node: dict[str, SpanRecord] = {}
        for o in peers:
            st = standing(o.node_address)
            size = o.end - o.start
            by_node[o.node_address] = o
            node_offers.append(
                NodeOffer(
                    node_id=NodeId(o.node_address),
                    peer_id=PeerId(o.peer_id),
                    model_id=ModelId(served.model_id),
                    served=LayerRange(start=o.start, end=o.end),
                    compute_ms_per_layer=1000.0 / max(o.throughput, 1e-6) / size,
                    network_latency_ms=settings.hop_latency_ms,
                    bandwidth_bytes_per_s=settings.hop_bandwidth_bytes_per_s,
                    free_kv_slots=o.free_slots,
                    kv_bytes_per_token_layer=kv_bytes_per_token_layer(served),
                    free_memory_bytes=2**62,  # workers bound sessions by slots; memory is not announced yet
                    price_per_token_layer=math.ceil(o.price_per_token / size),  # conservative for max_cost
                    price_per_token=o.price_per_token,  # the whole span: exactly what its receipt bills
                    stake_ok=st.routable,
                    reputation_bps=st.reputation_bps,
                    failure_risk=min(max(risk(o.node_address) if risk else settings.default_failure_risk, 0.0), 1.0),
                    attestation_verified=st.attests(o.attestation_hash),
                    splittable=False,
                )
            )
        hidden = int(served.manifest.config.get("hidden_size") or served.manifest.config.get("n_embd") or 0)
        state = NetworkState(
            model_id=ModelId(served.model_id),
            num_layers=served.num_layers,
            activation_bytes_per_token=hidden * DTYPE_BYTES[served.manifest.dtype],
            offers=tuple(node_offers),
        )
        sched_policy = SchedulerPolicy(
            privacy=policy.privacy,
            max_latency_ms_per_token=policy.max_latency_ms,
            max_cost=None if policy.max_cost is None else cost_budget(policy.max_cost, fee_bps),
            min_reputation_bps=settings.min_reputation_bps,
        )
        pool = None
        if fallback_offer is not None:
            pool = FallbackPool(
                node_id=NodeId(fallback_offer.node_address),
                peer_id=PeerId(fallback_offer.peer_id),
                price_per_token=fallback_offer.price_per_token,
                compute_ms_per_token=1000.0 / max(fallback_offer.throughput, 1e-6),
                network_latency_ms=settings.hop_latency_ms,
                min_network_capacity_slots=settings.fallback_min_capacity_slots,
            )
            by_node[fallback_offer.node_address] = fallback_offer
        request = RouteRequest(
            model_id=ModelId(served.model_id), prompt_tokens=prompt_tokens, max_new_tokens=max_tokens
        )
        try:
            route = scheduler.plan_route(
                state, request, sched_policy, pool, time_limit_s=settings.schedule_time_limit_s
            )
        except scheduler.NoRouteError as exc:
            raise no_route(exc.reason) from exc
        hops = []
        for h in route.hops:
            o = by_node[h.node_id]
            hops.append(RouteHop(o.peer_id, o.node_address, h.layers.start, h.layers.end, o.price_per_token))
        if policy.privacy == "high":
            if route.fallback or (hops[0].start, hops[0].end) != (0, entry_end):
                raise no_route(f"no worker serves exactly the first stage [0, {entry_end}) for a privacy=high job")
            partner = share_partner(peers, hops[0], standing, settings.min_reputation_bps)
            return PlannedRoute([hops[0], partner, *hops[1:]], route.latency_ms_per_token, shares=2)
        return PlannedRoute(hops, estimated_latency_ms=route.latency_ms_per_token, fallback=route.fallback)

    return plan


def share_partner(
    offers: list[SpanRecord],
    first: RouteHop,
    standing: StandingLookup,
    min_reputation_bps: int,
    max_price: int | None = None,
) -> RouteHop:
    """The second worker of a privacy=high job's first stage (or the replacement of a failed
    one, at most ``max_price``): serving exactly ``first``'s range, staked, reputed, attested like
    any routed node, of another node and another operator (the two share workers together could
    rebuild the activations, so they must not be one party); cheapest, then fastest.
    :func:`no_route` when there is none."""
    first_operator = standing(first.node).operator.lower()
    best: SpanRecord | None = None
    for o in offers:
        if (o.start, o.end) != (first.start, first.end) or o.node_address.lower() == first.node.lower():
            continue
        if max_price is not None and o.price_per_token > max_price:
            continue
        st = standing(o.node_address)
        if not (
            st.routable
            and st.attests(o.attestation_hash)
            and st.reputation_bps >= min_reputation_bps
            and o.free_slots > 0
        ):
            continue
        if first_operator and st.operator.lower() == first_operator:
            continue
        if best is None or (o.price_per_token, -o.throughput) < (best.price_per_token, -best.throughput):
            best = o
    if best is None:
        raise no_route(
            f"a privacy=high job computes the first stage [{first.start}, {first.end}) on secret shares at two "
            "workers of different operators; only one such worker (staked, reputed, attested, with a free slot) "
            "is online. Start a first-stage worker under another operator, or send the job with privacy=low"
        )
    return RouteHop.of(best)
