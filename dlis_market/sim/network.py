"""The simulated peers and the network state the scheduler sees, with candidate pruning.

:class:`PeerTable` keeps every peer's static figures and live state (online, sessions, stake,
reputation, dropout risk) in numpy arrays. :meth:`PeerTable.state` builds the
:class:`~dlis_market.broker.network_state.NetworkState` that the real
:func:`~dlis_market.broker.scheduler.plan_route` gets for one request, the way
``broker/planning.py`` builds it from announcements (spans offered whole, ``splittable=False``;
compute from the announced throughput under the worker's current load).

**Pruning** (the scheduler has none; this is the sim's network-state builder, not the
scheduler). Offers the scheduler would exclude anyway (offline, unstaked, below the policy's
reputation, no free KV slot, not enough memory, already failed for this job) are dropped first.
Then, per distinct span ``[start, end)``, only the ``top_k`` offers with the least objective
(the scheduler's own ``weight_compute * compute + weight_transfer * transfer + weight_risk *
risk``) and the ``top_k`` cheapest are kept. Every route uses each span at most once with one
node, so for a policy without budgets the best offer of each span is enough and the route is the
same as on the full network; with ``max_latency`` / ``max_cost`` budgets the fastest and cheapest
per span are kept, and the ILP proves optimality on the pruned set only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dlis_market.broker.network_state import NetworkState, NodeOffer, Policy, RouteRequest
from dlis_market.sim.profiles import DeviceProfile, slowdowns
from dlis_market.types import LayerRange, ModelId, NodeId, PeerId

MAX_BPS = 10_000


@dataclass
class PeerSpec:
    """One simulated peer as drawn from the scenario."""

    device: str
    profile: DeviceProfile
    layers: LayerRange
    price_per_token: int  # for its whole span, as a worker announces it
    stake: int
    byzantine: float
    host: str | None = None  # the scenario's host it shares CPU on


@dataclass
class PeerTable:
    specs: list[PeerSpec]
    model_id: ModelId
    num_layers: int
    activation_bytes_per_token: int
    kv_bytes_per_token_layer: int
    min_stake: int
    offers_track_load: bool = True  # offers carry the compute time under the peer's current load
    # live state, one entry per peer
    up: np.ndarray = field(init=False)
    sessions: np.ndarray = field(init=False)
    stake_ok: np.ndarray = field(init=False)
    reputation: np.ndarray = field(init=False)
    risk: np.ndarray = field(init=False)
    stakes: list[int] = field(init=False)  # exact token units (beyond int64)

    def __post_init__(self) -> None:
        n = len(self.specs)
        self.ids = [NodeId(f"sim-peer-{i:05d}") for i in range(n)]
        self.peer_ids = [PeerId(f"sim-p2p-{i:05d}") for i in range(n)]
        self.start = np.array([s.layers.start for s in self.specs], dtype=np.int64)
        self.end = np.array([s.layers.end for s in self.specs], dtype=np.int64)
        self.size = self.end - self.start
        self.compute = np.array([s.profile.compute_ms_per_layer for s in self.specs])
        self.advertised = np.array(
            [s.profile.advertised_ms_per_layer or s.profile.compute_ms_per_layer for s in self.specs]
        )
        self.latency = np.array([s.profile.link_latency_ms for s in self.specs])
        self.bandwidth = np.array([s.profile.bandwidth_bytes_per_s for s in self.specs])
        self.transfer = self.latency + 1000.0 * self.activation_bytes_per_token / self.bandwidth
        self.max_sessions = np.array([s.profile.max_sessions for s in self.specs], dtype=np.int64)
        self.memory = np.array([s.profile.memory_bytes for s in self.specs], dtype=np.int64)
        # broker/planning.py: price per token and layer rounded up, conservative for max_cost
        self.price_per_layer = [-(-s.price_per_token // s.layers.size) for s in self.specs]
        self.price = np.array(self.price_per_layer, dtype=np.float64)
        self.up = np.ones(n, dtype=bool)
        self.sessions = np.zeros(n, dtype=np.int64)
        self.stakes = [s.stake for s in self.specs]
        self.stake_ok = np.array([s >= self.min_stake for s in self.stakes], dtype=bool)
        self.reputation = np.full(n, MAX_BPS, dtype=np.int64)  # unscored nodes count as 10000 bps
        self.risk = np.zeros(n)
        spans: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(self.specs):
            spans.setdefault((s.layers.start, s.layers.end), []).append(i)
        self.spans = {k: np.array(v, dtype=np.int64) for k, v in sorted(spans.items())}
        self._offers: dict[int, tuple[tuple[Any, ...], NodeOffer]] = {}  # peer -> (live figures, offer)

    def __len__(self) -> int:
        return len(self.specs)

    def set_stake(self, peer: int, stake: int) -> None:
        self.stakes[peer] = stake
        self.stake_ok[peer] = stake >= self.min_stake

    def candidates(self, request: RouteRequest, policy: Policy, excluded: set[int], top_k: int) -> list[int]:
        """Peer indices offered to the scheduler for this request (see the module's pruning)."""
        tokens = request.total_tokens
        eligible = (
            self.up
            & self.stake_ok
            & (self.sessions < self.max_sessions)
            & (self.reputation >= policy.min_reputation_bps)
            & (self.memory >= tokens * self.kv_bytes_per_token_layer)
        )
        if excluded:
            eligible[list(excluded)] = False
        compute = self._offered(slice(None)) * self.size
        objective = policy.weight_compute * compute + policy.weight_transfer * self.transfer
        objective += policy.weight_risk * self.risk
        out: list[int] = []
        for members in self.spans.values():
            live = members[eligible[members]]
            if live.size <= 2 * top_k:
                out.extend(live.tolist())
                continue
            best = live[np.argpartition(objective[live], top_k)[:top_k]]
            cheap = live[np.argpartition(self.price[live], top_k)[:top_k]]
            out.extend(np.union1d(best, cheap).tolist())
        return out

    def _offered(self, peers: Any) -> np.ndarray:
        """Per-layer compute time the scheduler is offered for ``peers`` (an index or a slice): the
        announced figure, times the slowdown one more session would bring when offers track load."""
        if not self.offers_track_load:
            return np.asarray(self.advertised[peers])
        return np.asarray(self.advertised[peers] * slowdowns(self.sessions[peers] + 1))

    def offer(self, i: int, compute_ms_per_layer: float) -> NodeOffer:
        """Peer ``i``'s announcement as the broker turns it into an offer (planning.py); its
        compute time per layer is the one it measures under its current load."""
        # model_construct: these figures come from the scenario, already validated; building
        # thousands of offers per simulated minute is the sim's hot path.
        return NodeOffer.model_construct(
            node_id=self.ids[i],
            peer_id=self.peer_ids[i],
            model_id=self.model_id,
            served=self.specs[i].layers,
            compute_ms_per_layer=compute_ms_per_layer,
            network_latency_ms=float(self.latency[i]),
            bandwidth_bytes_per_s=float(self.bandwidth[i]),
            free_kv_slots=int(self.max_sessions[i] - self.sessions[i]),
            kv_bytes_per_token_layer=self.kv_bytes_per_token_layer,
            free_memory_bytes=int(self.memory[i]),
            price_per_token_layer=self.price_per_layer[i],
            stake_ok=bool(self.stake_ok[i]),
            reputation_bps=int(self.reputation[i]),
            failure_risk=float(min(max(self.risk[i], 0.0), 1.0)),
            attestation_verified=True,
            splittable=False,
        )

    def state(
        self, request: RouteRequest, policy: Policy, excluded: set[int] | None = None, top_k: int = 8
    ) -> tuple[NetworkState, dict[str, int]]:
        """The pruned network state for ``request`` and the peer index of each offered node id."""
        picked = self.candidates(request, policy, excluded or set(), top_k)
        loaded = self._offered(picked).tolist()
        offers = []
        for i, c in zip(picked, loaded, strict=True):
            live = (c, int(self.sessions[i]), bool(self.stake_ok[i]), int(self.reputation[i]), float(self.risk[i]))
            hit = self._offers.get(i)
            if hit is None or hit[0] != live:
                hit = (live, self.offer(i, c))
                self._offers[i] = hit
            offers.append(hit[1])
        state = NetworkState.model_construct(
            model_id=self.model_id,
            num_layers=self.num_layers,
            activation_bytes_per_token=self.activation_bytes_per_token,
            offers=tuple(offers),
        )
        return state, {self.ids[i]: i for i in picked}
