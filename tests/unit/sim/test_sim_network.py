"""The sim's pruned network state gives plan_route the same route as the full network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dlis_market.broker.network_state import Policy, RouteRequest
from dlis_market.broker.scheduler import plan_route
from dlis_market.settings import Settings
from dlis_market.sim.engine import build_peers
from dlis_market.sim.errors import ScenarioError
from dlis_market.sim.network import PeerTable
from dlis_market.sim.scenario import Market, Population, apply_change, load_scenario
from dlis_market.types import model_id


def test_pruned_state_keeps_the_optimal_route_without_budgets(settings: Settings) -> None:
    sc = load_scenario(Path("scale"))
    sc = sc.model_copy(update={"population": Population(count=400, mix=sc.population.mix)})  # type: ignore[union-attr]
    market = Market.of(sc.market, settings)
    specs = build_peers(sc, market, seed=5)
    table = PeerTable(specs, model_id("smollm2-135m", "0x" + "00" * 20), 30, 1152, 768, market.min_stake)
    rng = np.random.default_rng(5)
    table.sessions[:] = rng.integers(0, 2, len(specs))
    table.risk[:] = rng.uniform(0, 0.05, len(specs))
    table.up[:] = rng.random(len(specs)) > 0.1
    request = RouteRequest(model_id=table.model_id, prompt_tokens=32, max_new_tokens=32)
    policy = Policy()
    pruned, _ = table.state(request, policy, top_k=2)
    full, _ = table.state(request, policy, top_k=len(specs))  # every eligible offer, unpruned
    assert len(pruned.offers) < len(full.offers) // 4
    a, b = plan_route(pruned, request, policy), plan_route(full, request, policy)
    assert a.optimal and b.optimal
    assert abs(a.objective - b.objective) < 1e-9
    assert [h.node_id for h in a.hops] == [h.node_id for h in b.hops]


def test_a_change_names_what_it_accepts() -> None:
    sc = load_scenario(Path("demo"))
    with pytest.raises(ScenarioError, match="add-peers=N"):
        apply_change(sc, "add-nodes=2")
    with pytest.raises(ScenarioError, match="not a number"):
        apply_change(sc, "check-fraction=lots")
    assert len(apply_change(sc, "add-peers=2").peers) == len(sc.peers) + 2
    assert all(g.device != "phone" for g in apply_change(sc, "remove-device=phone").peers)
