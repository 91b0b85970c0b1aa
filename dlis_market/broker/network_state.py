"""What the route scheduler reads and returns: node offers, network state, request, policy, route.

All are frozen, strict wire models. Units are in the field names: times are milliseconds *per
token* (one decode step through the pipeline), prices and costs are integer token units, memory
is bytes, probabilities are in ``[0, 1]``, reputation is in basis points. A layer range is
``[start, end)``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dlis_market.types import LayerRange, ModelId, NodeId, PeerId, WireModel

SolverName = Literal["ilp", "greedy", "fallback"]


class NodeOffer(WireModel):
    """One worker's announcement for one model: the span it serves and what a session there costs.

    Comes from the DHT (spans, throughput, free KV cache, liveness), the chain (stake) and the
    oracle (reputation, failure risk, attestation). Nothing in it is trusted to be consistent with
    the model: the scheduler drops offers whose range does not fit ``NetworkState.num_layers``.
    """

    node_id: NodeId
    peer_id: PeerId
    model_id: ModelId
    served: LayerRange
    compute_ms_per_layer: float = Field(ge=0)  # decode time of one token through one layer
    network_latency_ms: float = Field(ge=0)  # one-way latency to reach this node
    bandwidth_bytes_per_s: float = Field(gt=0)  # inbound bandwidth for activations
    free_kv_slots: int = Field(ge=0)  # sessions the node can still open
    kv_bytes_per_token_layer: int = Field(ge=0)  # KV cache one token needs in one layer
    free_memory_bytes: int = Field(ge=0)  # memory left for new sessions' KV cache
    price_per_token_layer: int = Field(ge=0)  # token units per token per layer served
    # The offer's price per token for its whole span, when it has one (a worker bills its whole
    # span at one price): a hop over the whole span then costs exactly this per token, as its
    # receipt will bill (``protocol.pricing.stage_charge``), not the per-layer approximation.
    price_per_token: int | None = Field(default=None, ge=0)
    stake_ok: bool  # staked at or above the minimum and not slashed: routable on chain
    reputation_bps: int = Field(ge=0, le=10_000)
    failure_risk: float = Field(ge=0, le=1)  # probability that a session here fails (oracle)
    attestation_verified: bool
    # False when the worker runs its whole span only (a stage loaded from one shard): the route
    # then uses [served.start, served.end) as one hop or not at all.
    splittable: bool = True


class NetworkState(WireModel):
    """A snapshot of every offer for one model, taken by the broker before it plans a route."""

    model_id: ModelId
    num_layers: int = Field(ge=1)
    activation_bytes_per_token: int = Field(ge=0)  # hidden size x dtype bytes, sent between stages
    offers: tuple[NodeOffer, ...]


class RouteRequest(WireModel):
    """The part of a job the scheduler needs: which model and how many tokens."""

    model_id: ModelId
    prompt_tokens: int = Field(ge=1)
    max_new_tokens: int = Field(ge=0)

    @property
    def total_tokens(self) -> int:
        """Tokens every stage processes and keeps KV cache for: prompt plus generated."""
        return self.prompt_tokens + self.max_new_tokens


class Policy(WireModel):
    """The client's constraints and the operator's objective weights.

    The objective is ``weight_compute * compute_ms + weight_transfer * transfer_ms +
    weight_risk * failure_risk``; ``weight_risk`` is therefore milliseconds per unit of failure
    probability (the default values 1 % of risk like 10 ms per token).
    """

    privacy: Literal["low", "high"] = "low"  # high: only nodes with a verified attestation
    max_latency_ms_per_token: float | None = Field(default=None, gt=0)
    max_cost: int | None = Field(default=None, ge=0)  # token units for the whole job
    min_reputation_bps: int = Field(default=0, ge=0, le=10_000)
    weight_compute: float = Field(default=1.0, ge=0)
    weight_transfer: float = Field(default=1.0, ge=0)
    weight_risk: float = Field(default=1000.0, ge=0)


class FallbackPool(WireModel):
    """A cloud worker serving the whole model, used when the peer network cannot take the job.

    ``min_network_capacity_slots``: when the network could hold fewer concurrent sessions than
    this (see ``network_capacity``), jobs go to the pool even if a route exists.
    """

    node_id: NodeId
    peer_id: PeerId
    price_per_token: int = Field(ge=0)  # token units per token for the whole model
    compute_ms_per_token: float = Field(ge=0)
    network_latency_ms: float = Field(ge=0)
    failure_risk: float = Field(default=0.0, ge=0, le=1)
    attestation_verified: bool = True
    min_network_capacity_slots: int = Field(default=0, ge=0)


class Hop(WireModel):
    """One stage of a route: a node serving ``layers`` for this job."""

    node_id: NodeId
    peer_id: PeerId
    layers: LayerRange
    compute_ms: float
    transfer_ms: float
    failure_risk: float
    cost: int


class Route(WireModel):
    """Hops covering ``[0, num_layers)`` contiguously, in order, with the scheduler's estimates.

    ``failure_risk`` is the sum of the hops' risks (the union bound on the probability that some
    hop fails; the linear model the ILP optimises). ``latency_ms_per_token`` is
    ``compute_ms + transfer_ms``. ``optimal`` is true when the ILP proved the route optimal.
    """

    model_id: ModelId
    hops: tuple[Hop, ...]
    compute_ms: float
    transfer_ms: float
    latency_ms_per_token: float
    failure_risk: float
    cost: int
    objective: float
    fallback: bool
    fallback_reason: str | None = None
    solver: SolverName
    optimal: bool
    solve_time_ms: float
