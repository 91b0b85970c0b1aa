"""Reference helpers: tiny configs of each family and transformers' own generate."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, PretrainedConfig


def tiny_configs() -> dict[str, PretrainedConfig]:
    common = {"vocab_size": 96, "max_position_embeddings": 64, "initializer_range": 0.2}
    return {
        "llama": LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            **common,
        ),
        "gpt2": GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **common),
        "gemma3": Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=4,
            final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            **common,
        ),
    }


def load_reference(model_dir: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # from_pretrained leaves weights at their offsets in the mmapped file; BLAS takes another
    # kernel for unaligned weight pointers and the logits move by ~1e-5 (two HF loads of the same
    # weights at different alignments disagree just as much). Stages hold freshly allocated
    # (aligned) tensors, so the reference does too: the comparison then measures the pipeline.
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    model.generation_config.eos_token_id = None  # compare full lengths
    return model


# fp32 unit roundoff.
FP32_U = 2.0**-24
# Probabilistic rounding-error bound (Higham & Mary, SIAM J. Sci. Comput. 2019, thm 2.4): a chain of
# n fp32 multiply-adds computed in two different orders differs by at most lam * sqrt(n) * u of the
# magnitudes involved, with probability >= 1 - 2 exp(-lam^2 / 2); lam = 4 gives 1 - 7e-4.
ROUNDING_LAMBDA = 4.0


def fp32_logit_tolerance(config: PretrainedConfig, reference_logits: list[torch.Tensor]) -> float:
    """How far two correct fp32 computations of these logits may differ, from summation order only.

    Batching sessions together, splitting into stages and memory alignment change which BLAS kernel
    runs and so the order of the fp32 sums, nothing else. Each logit sits at the end of about
    ``num_layers * width`` multiply-adds (width = the widest matmul input), so the tolerance is the
    bound above for that many terms, scaled by the logits' magnitude. On the tiny test models it is
    ~1.5e-5 (measured differences up to 1.6e-6); on SmolLM2 ~2e-3 (measured 0). A wrong layer, position
    or cache entry moves logits by orders of magnitude more.
    """
    hidden = int(config.hidden_size)
    width = max(
        hidden, int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden)
    )
    terms = int(config.num_hidden_layers) * width
    scale = max(float(t.abs().max()) for t in reference_logits)
    return ROUNDING_LAMBDA * terms**0.5 * FP32_U * scale


def hf_generate(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and per-step raw logits from transformers ``generate`` on one unpadded prompt."""
    ids = torch.tensor([prompt])
    out = model.generate(  # type: ignore[operator]
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences[0, len(prompt) :].tolist(), [step[0] for step in out.logits]
