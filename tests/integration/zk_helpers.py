"""A real EZKL proof of a tiny head for the on-chain proof tests (chain/ and broker/)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dlis_market.inference.zk_stage import FinalHead, ZkStageCircuit, prepare_circuit, prove_stage
from dlis_market.oracle.zk_verify import StageVerifyingKey

HIDDEN, VOCAB = 8, 16


@dataclass(frozen=True)
class ProvenHead:
    circuit: ZkStageCircuit
    key: StageVerifyingKey
    proof: bytes  # EZKL's proof JSON
    tokens: list[int]  # the head's argmax per row: what an honest last stage bills


def proven_head(cache: Path, tokens: int) -> ProvenHead:
    """The final norm + LM head of a seeded hidden-8 x vocab-16 Llama, set up for ``tokens`` rows
    (~2 s) and proven once on random rows (~1-2 s)."""
    torch.manual_seed(5)
    config = LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB, max_position_embeddings=16,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # spread the logits so each row's best is clear of quantization steps
        model.lm_head.weight.normal_(0.0, 0.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
    head = FinalHead.of(model)
    x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(9))
    circuit = prepare_circuit(head, x, cache, progress=False)
    proof = prove_stage(circuit, x, progress=False).proof
    with torch.no_grad():
        ids = [int(t) for t in head(x).argmax(-1).flatten()]
    return ProvenHead(circuit, StageVerifyingKey(circuit.settings_path, circuit.vk_path, circuit.srs_path), proof, ids)
