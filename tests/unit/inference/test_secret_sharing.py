"""Secret-shared first projection and secure aggregation (inference/secret_sharing.py)."""

from __future__ import annotations

import secrets

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dlis_market.inference.secret_sharing import (
    FixedPoint,
    SecretSharingError,
    SharedLinear,
    aggregate,
    masked_partial,
    pair_key,
    private_linear,
    reconstruct,
    share,
)

CODEC = FixedPoint()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def first_projection_inputs(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """What the client computes locally: embeddings, then layer 0's input RMSNorm."""
    with torch.no_grad():
        return model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(ids)))


def test_shared_qkv_projection_matches_the_model():
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])  # one round trip for q, k, v
    left, right = SharedLinear(w, CODEC), SharedLinear(w, CODEC)
    x = first_projection_inputs(model, [5, 17, 42, 3, 88])
    got = private_linear(x, left, right)
    with torch.no_grad():
        want = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
    assert got.shape == want.shape == (5, 64 + 32 + 32)
    assert (got - want).abs().max() < 1e-5


def test_one_share_says_nothing_and_one_alone_reconstructs_garbage():
    x = CODEC.encode_x(torch.full((4, 8), 0.5))
    a1, b1 = share(x)
    a2, _ = share(x)
    assert not torch.equal(a1, a2)  # fresh randomness per sharing
    assert torch.equal(reconstruct(a1, b1), x)
    # a worker's share decoded as if it were the input is noise of the ring's size, not ~0.5
    assert CODEC.decode(a1 * (1 << CODEC.w_bits)).abs().median() > 1e3


def test_overflow_is_refused_with_the_numbers():
    w = torch.full((4, 512), 8.0)
    with pytest.raises(SecretSharingError, match="fewer fraction bits"):
        private_linear(torch.full((2, 512), 1e4), SharedLinear(w, CODEC), SharedLinear(w, CODEC))
    with pytest.raises(SecretSharingError, match=r"int64 \[tokens, 512\]"):
        SharedLinear(w, CODEC).apply(torch.zeros(2, 64, dtype=torch.int64))


def test_secure_aggregation_reveals_only_the_sum():
    torch.manual_seed(1)
    size, secret, label = 3, secrets.token_bytes(32), b"job-1:step-0:layer-0:o_proj"
    keys = [{j: pair_key(secret + bytes([min(i, j), max(i, j)]), i, j, label) for j in range(size) if j != i}
            for i in range(size)]  # fmt: skip
    partials = [torch.randn(3, 16) for _ in range(size)]
    masked = [masked_partial(p, i, size, keys[i], CODEC) for i, p in enumerate(partials)]
    total = aggregate(masked, size, CODEC)
    assert (total - sum(partials)).abs().max() < 1e-5
    for p, m in zip(partials, masked, strict=True):  # what the aggregator sees of one member is noise
        assert (CODEC.decode(m * (1 << CODEC.w_bits)) - p).abs().median() > 1e3
    # without one member the masks do not cancel: the sum would be noise, so it is refused
    assert (
        CODEC.decode((masked[0] + masked[1]) * (1 << CODEC.w_bits)) - (partials[0] + partials[1])
    ).abs().median() > 1e3
    with pytest.raises(SecretSharingError, match="2 of 3 members"):
        aggregate(masked[:2], size, CODEC)
    with pytest.raises(SecretSharingError, match="no pairwise key"):
        masked_partial(partials[0], 0, size, {1: keys[0][1]}, CODEC)
