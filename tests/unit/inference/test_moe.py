"""Experts on other workers (inference/moe.py): exact against the unsplit model, failover, placement."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from dlis_market.inference.moe import (
    ExpertShard,
    MoEError,
    RoutedMoE,
    mixtral_experts,
    place_experts,
    upcycle,
)

from .reference import hf_generate


def greedy(model, prompt: list[int], new: int) -> tuple[torch.Tensor, list[int]]:
    """Greedy tokens and per-step logits through transformers generate (KV cache: prefill, then one
    token per step)."""
    tokens, logits = hf_generate(model, prompt, new)
    return torch.stack(logits), tokens


def distribute(model, workers: list[str], replicas: int) -> tuple[dict[str, ExpertShard], list[RoutedMoE]]:
    """Every layer's experts onto ``workers`` (placed by equal load), the router left in the model."""
    cfg = model.config
    n = cfg.num_local_experts
    placement = place_experts(dict.fromkeys(range(n), 1.0), workers, capacity=n, replicas=replicas)
    act = model.model.layers[0].mlp.experts.act_fn
    held: dict[str, dict] = {w: {} for w in workers}
    for i, layer in enumerate(model.model.layers):
        for (li, e), weights in mixtral_experts(layer.mlp, i).items():
            for w in placement[e]:
                held[w][(li, e)] = weights
    shards = {w: ExpertShard(w, held[w], act) for w in workers}
    blocks = []
    for i, layer in enumerate(model.model.layers):
        block = RoutedMoE(i, layer.mlp.gate.weight.detach(), cfg.num_experts_per_tok, placement, shards)
        layer.mlp = block
        blocks.append(block)
    return shards, blocks


def small_mixtral() -> MixtralForCausalLM:
    torch.manual_seed(3)
    cfg = MixtralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return MixtralForCausalLM(cfg).eval()


PROMPT = [5, 17, 42, 3, 88, 9]


def test_experts_on_two_workers_equal_the_model_and_only_chosen_tokens_travel():
    model = small_mixtral()
    want_logits, want = greedy(model, PROMPT, 5)
    split = copy.deepcopy(model)
    shards, blocks = distribute(split, ["w0", "w1"], replicas=1)
    got_logits, got = greedy(split, PROMPT, 5)
    assert got == want
    assert (got_logits - want_logits).abs().max() < 1e-5
    # the prefill (6 tokens) and 4 decode steps send each token to its top-2 experts only
    tokens = len(PROMPT) + 4
    assert sum(b.rows_sent for b in blocks) == 2 * tokens * 2  # 2 layers x tokens x top-2
    served = sum(sum(s.served.values()) for s in shards.values())
    assert served == 2 * tokens * 2 and all(s.served for s in shards.values())  # both workers billed


def test_a_dead_expert_worker_fails_over_to_a_replica_with_identical_output():
    model = small_mixtral()
    _, want = greedy(model, PROMPT, 4)
    split = copy.deepcopy(model)
    shards, _ = distribute(split, ["w0", "w1", "w2"], replicas=2)
    ids = list(PROMPT)
    got = []
    with torch.no_grad():
        for step in range(4):
            if step == 2:
                shards["w0"].alive = False  # killed mid-job
            token = int(split(torch.tensor([ids])).logits[0, -1].argmax())
            got.append(token)
            ids.append(token)
    assert got == want
    served_after = {w: s.served for w, s in shards.items()}
    assert sum(served_after["w0"].values()) > 0  # it served before it died
    for w in ("w1", "w2"):
        shards[w].alive = False
    with pytest.raises(MoEError, match="no live replica of expert"):
        split(torch.tensor([ids]))


def test_placement_balances_load_and_respects_room():
    load = {0: 8.0, 1: 1.0, 2: 4.0, 3: 4.0, 4: 2.0, 5: 1.0}
    placed = place_experts(load, ["a", "b", "c"], capacity=4, replicas=2)
    assert all(len(set(ws)) == 2 for ws in placed.values())
    per_worker = {w: sum(load[e] / 2 for e, ws in placed.items() if w in ws) for w in "abc"}
    mean = sum(load.values()) / 3  # largest-first greedy: within 4/3 of the best split
    assert 0.8 * mean <= min(per_worker.values()) and max(per_worker.values()) <= 1.2 * mean
    assert max(sum(w in ws for ws in placed.values()) for w in "abc") <= 4
    with pytest.raises(MoEError, match="do not fit"):
        place_experts(load, ["a", "b"], capacity=2, replicas=2)


def test_smollm2_upcycled_into_experts_equals_smollm2(smollm2_dir: Path):
    dense = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompt = [504, 3458, 282, 4649, 314]
    want_logits, want = greedy(dense, prompt, 2)
    moe = copy.deepcopy(dense)
    act = moe.model.layers[0].mlp.act_fn
    torch.manual_seed(0)
    placement = place_experts(dict.fromkeys(range(4), 1.0), ["w0", "w1"], capacity=2)
    held: dict[str, dict] = {"w0": {}, "w1": {}}
    for i, layer in enumerate(moe.model.layers):
        for e, weights in upcycle(layer.mlp, 4).items():
            held[placement[e][0]][(i, e)] = weights
    shards = {w: ExpertShard(w, held[w], act) for w in held}
    for i, layer in enumerate(moe.model.layers):
        router = torch.randn(4, moe.config.hidden_size) * 0.02
        layer.mlp = RoutedMoE(i, router, 2, placement, shards)
    got_logits, got = greedy(moe, prompt, 2)
    assert got == want
    assert (got_logits - want_logits).abs().max() < 1e-4
