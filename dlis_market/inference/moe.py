"""Mixture-of-experts layers whose experts live on other workers (expert parallelism).

The router runs with the attention stage: for each token it picks its top-k experts and their
weights exactly as the model does (Mixtral/OLMoE-style: softmax over the router logits, top-k,
renormalised). Only the rows of the tokens that chose an expert travel to a worker holding it;
each worker returns ``down(act(gate(x)) * up(x))`` for its rows; the router weighs and adds the
answers in expert order, the same order transformers' fused experts use, so the layer's output
equals the unsplit model's.

- :class:`ExpertShard` — what an expert worker holds: some experts of some layers (views of the
  model's tensors, no copies) and a counter of the tokens it served per expert (what its
  receipts bill).
- :func:`place_experts` — experts onto workers by expected load (greedy largest-first onto the
  least loaded worker with room), each expert on ``replicas`` distinct workers.
- :class:`RoutedMoE` — the router side: a drop-in for a layer's MoE block that dispatches to the
  placement's workers and fails over to the next replica of an expert whose worker is gone.
- :func:`upcycle` — a dense Llama/SmolLM2 MLP as N identical experts behind a router: the MoE of
  it computes exactly the dense model (the routing weights of a token sum to 1), which makes a
  real checkpoint testable as an MoE.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dlis_market.inference.errors import ExpertUnavailableError, MoEError


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's MLP: ``gate_up`` [2I, H] (gate rows first, then up) and ``down`` [H, I]."""

    gate_up: torch.Tensor
    down: torch.Tensor


class ExpertShard:
    """An expert worker: the experts ``(layer, expert)`` it holds and the tokens it served."""

    def __init__(self, worker: str, experts: Mapping[tuple[int, int], ExpertWeights], act: Callable[..., Any]):
        self.worker = worker
        self.experts = dict(experts)
        self.act = act
        self.served: Counter[tuple[int, int]] = Counter()  # (layer, expert) -> tokens: what receipts bill
        self.alive = True

    def compute(self, layer: int, expert: int, rows: torch.Tensor) -> torch.Tensor:
        if not self.alive:
            raise ExpertUnavailableError(f"expert worker {self.worker} is gone")
        weights = self.experts.get((layer, expert))
        if weights is None:
            raise MoEError(f"worker {self.worker} does not hold expert {expert} of layer {layer}")
        gate, up = F.linear(rows, weights.gate_up).chunk(2, dim=-1)
        self.served[(layer, expert)] += rows.shape[0]
        return F.linear(self.act(gate) * up, weights.down)


def place_experts(
    load: Mapping[int, float], workers: Sequence[str], capacity: int, replicas: int = 1
) -> dict[int, list[str]]:
    """Expert -> the workers that hold it: ``replicas`` distinct workers each, at most ``capacity``
    experts per worker, heaviest experts first onto the least loaded worker with room."""
    if replicas > len(workers):
        raise MoEError(f"{replicas} replicas per expert need at least {replicas} workers, got {len(workers)}")
    if len(load) * replicas > capacity * len(workers):
        raise MoEError(
            f"{len(load)} experts x {replicas} replicas do not fit {len(workers)} workers of {capacity} experts"
        )
    placed: dict[int, list[str]] = {}
    worker_load = dict.fromkeys(workers, 0.0)
    held = dict.fromkeys(workers, 0)
    for expert in sorted(load, key=lambda e: (-load[e], e)):
        chosen: list[str] = []
        for _ in range(replicas):
            free = [w for w in workers if held[w] < capacity and w not in chosen]
            if not free:  # the total fits but not spread over distinct workers
                raise MoEError(
                    f"expert {expert}: no worker with room left for replica {len(chosen) + 1} of {replicas} "
                    f"(capacity {capacity} each); add workers or capacity"
                )
            best = min(free, key=lambda w: (worker_load[w], workers.index(w)))
            chosen.append(best)
            held[best] += 1
            worker_load[best] += load[expert] / replicas
        placed[expert] = chosen
    return placed


class RoutedMoE(nn.Module):
    """A layer's MoE block with its experts on ``shards`` per ``placement`` (expert -> workers)."""

    def __init__(
        self, layer: int, router: torch.Tensor, top_k: int, placement: Mapping[int, Sequence[str]],
        shards: Mapping[str, ExpertShard],
    ) -> None:  # fmt: skip
        super().__init__()
        self.layer, self.top_k = layer, top_k
        self.router = router  # [E, H]
        self.placement = {e: list(ws) for e, ws in placement.items()}
        self.shards = shards
        self.rows_sent = 0  # token rows that travelled to expert workers (each token to its top-k only)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for expert in sorted(set(top_i.flatten().tolist())):  # expert order, as transformers adds them
            slot, token = torch.where(top_i.t() == expert)
            rows = self._call(expert, x[token])
            out.index_add_(0, token, (rows * top_w[token, slot, None]).to(out.dtype))
        return out.reshape(shape)

    def _call(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        tried = []
        for worker in self.placement.get(expert, []):
            shard = self.shards.get(worker)
            if shard is None:
                tried.append(f"{worker} (not connected)")
                continue
            try:
                answer = shard.compute(self.layer, expert, rows)
            except ExpertUnavailableError as exc:
                tried.append(f"{worker} ({exc})")
                continue
            self.rows_sent += rows.shape[0]
            return answer
        raise MoEError(
            f"no live replica of expert {expert} of layer {self.layer}: tried {tried or 'none placed'}; "
            "place it on more workers (replicas) or wait for one to return"
        )


def mixtral_experts(block: Any, layer: int) -> dict[tuple[int, int], ExpertWeights]:
    """A transformers Mixtral/OLMoE-style MoE block's experts as views (no copies)."""
    experts = block.experts
    return {
        (layer, e): ExpertWeights(experts.gate_up_proj[e].detach(), experts.down_proj[e].detach())
        for e in range(int(experts.num_experts))
    }


def upcycle(mlp: Any, n_experts: int) -> dict[int, ExpertWeights]:
    """A dense gated MLP (gate_proj, up_proj, down_proj) as ``n_experts`` identical experts."""
    weights = ExpertWeights(
        torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(), mlp.down_proj.weight.detach()
    )
    return dict.fromkeys(range(n_experts), weights)
