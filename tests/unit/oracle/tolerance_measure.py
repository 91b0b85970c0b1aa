"""Measure how far two *honest* runs of the same stage apart, per shard dtype (CPU).

Two workers serving the same shard differ only by floating-point re-association: BLAS thread
count and GEMM shapes (a session alone vs batched with others). This runs stage 0 of a small
random Llama (hidden 256, 4 layers, 2 stages) both ways for every shard dtype and reports
:func:`compare_outputs`'s relative difference, next to the differences a cheating worker would
show (serving another dtype than claimed, skipping a layer's output by feeding wrong tokens).

    .venv/bin/python -m tests.unit.oracle.tolerance_measure      # prints JSON

``test_tolerance.py`` (heavy) asserts :data:`TOLERANCES` sits between the two.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dlis_market.inference.messages import StageInput
from dlis_market.inference.shard_export import export_shards
from dlis_market.inference.stage import Stage
from dlis_market.protocol.outputs import compare_outputs

DTYPES = ("fp32", "bf16", "int8", "nf4")
PROMPT_LEN = 8
HIDDEN = 256
STEPS = 6


def tiny_model(path: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return path


def run_stage(shard_dir: Path, batch: int, threads: int, seed: int, target_tokens: torch.Tensor) -> np.ndarray:
    """Target session's hidden outputs (prefill + STEPS decode steps) with ``batch - 1`` companions."""
    torch.set_num_threads(threads)
    stage = Stage.load(shard_dir, index=0)
    gen = torch.Generator().manual_seed(seed)
    others = torch.randint(0, 512, (batch - 1, PROMPT_LEN + STEPS), generator=gen)
    tokens = torch.cat([target_tokens.view(1, -1), others])  # target is row 0
    ids = tuple(f"s{i}" for i in range(batch))
    for sid in ids:
        stage.open_session(sid, PROMPT_LEN + STEPS)
    rows = []
    out = stage.forward(StageInput(ids, (0,) * batch, 0, token_ids=tokens[:, :PROMPT_LEN]))
    assert out.hidden is not None
    rows.append(out.hidden[0].float().reshape(-1))
    for step in range(STEPS):
        pos = PROMPT_LEN + step
        out = stage.forward(StageInput(ids, (pos,) * batch, step + 1, token_ids=tokens[:, pos : pos + 1]))
        assert out.hidden is not None
        rows.append(out.hidden[0].float().reshape(-1))
    return torch.cat(rows).numpy().astype(np.float64)


def measure(workdir: Path, prompts: int = 4) -> dict[str, dict[str, float]]:
    model = tiny_model(workdir / "model")
    shards = {}
    for dtype in DTYPES:
        shards[dtype] = workdir / f"shards-{dtype}"
        export_shards(model, shards[dtype], stages=2, dtype=dtype)  # type: ignore[arg-type]
    threads_before = torch.get_num_threads()
    result: dict[str, dict[str, float]] = {}
    try:
        for p in range(prompts):
            target = torch.randint(0, 512, (PROMPT_LEN + STEPS,), generator=torch.Generator().manual_seed(100 + p))
            ref = {d: run_stage(shards[d], batch=1, threads=1, seed=p, target_tokens=target) for d in DTYPES}
            wrong_tokens = target.clone()
            wrong_tokens[PROMPT_LEN:] = (wrong_tokens[PROMPT_LEN:] + 1) % 512
            for d in DTYPES:
                honest = run_stage(shards[d], batch=4, threads=2, seed=p, target_tokens=target)
                row = result.setdefault(d, {"honest_max": 0.0})
                row["honest_max"] = max(row["honest_max"], compare_outputs(ref[d], honest, d, HIDDEN).rel_diff)
                for other in DTYPES:
                    if other != d:
                        key = f"served_{other}"
                        diff = compare_outputs(ref[d], ref[other], d, HIDDEN).rel_diff
                        row[key] = min(row.get(key, float("inf")), diff)
                cheat = run_stage(shards[d], batch=1, threads=1, seed=p, target_tokens=wrong_tokens)
                row["wrong_input_min"] = min(
                    row.get("wrong_input_min", float("inf")), compare_outputs(ref[d], cheat, d, HIDDEN).rel_diff
                )
    finally:
        torch.set_num_threads(threads_before)
    return result


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure(Path(tmp)), indent=2))
