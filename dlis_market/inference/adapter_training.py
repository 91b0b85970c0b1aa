"""Train a small LoRA adapter with PEFT, seeded, on the tiny dataset shipped with the package.

Tests and ``bench/lora_adapters.py`` need real adapters (trained, so ``B`` is not PEFT's zero
init and the adapter changes the output) without any download: a few optimiser steps on
``data/adapter_tiny.json`` give one in seconds on a tiny model. Models without a tokenizer (the
random test models) read the text as characters modulo their vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import peft
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from dlis_market.inference.adapters import ADAPTER_FILES, adapter_sha256
from dlis_market.inference.errors import AdapterIntegrityError


def tiny_dataset() -> list[str]:
    """The short lines of ``dlis_market/inference/data/adapter_tiny.json``."""
    text = resources.files(__package__).joinpath("data/adapter_tiny.json").read_text()
    lines: list[str] = json.loads(text)
    return lines


def _token_ids(model_dir: Path, lines: Sequence[str], vocab_size: int) -> list[int]:
    if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids: list[int] = []
        for line in lines:
            ids += tokenizer(line + "\n")["input_ids"]
        return ids
    return [ord(c) % vocab_size for c in "\n".join(lines) + "\n"]


def train_tiny_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    layers_to_transform: Sequence[int] | None = None,
    steps: int = 8,
    lr: float = 2e-2,
    block: int = 32,
    batch: int = 4,
    seed: int = 0,
    lines: Sequence[str] | None = None,
) -> str:
    """Train ``steps`` AdamW steps of a LoRA adapter on ``model_dir`` (an HF folder, fp32) and save
    it to ``out_dir`` with PEFT; returns its id (:func:`adapter_sha256`). Same seed, same bytes."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        layers_to_transform=list(layers_to_transform) if layers_to_transform is not None else None,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    ids = torch.tensor(_token_ids(model_dir, lines or tiny_dataset(), int(model.config.vocab_size)))
    blocks = ids[: len(ids) // block * block].view(-1, block)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    for _ in range(steps):
        rows = blocks[torch.randint(len(blocks), (batch,), generator=generator)]
        loss = peft_model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    peft_model.eval()
    # PEFT records the path the base was loaded from; a temp folder's path would give the same
    # weights another id on every run. The folder's name says which base it is.
    peft_model.peft_config["default"].base_model_name_or_path = model_dir.name
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)  # False: no hub lookup
    missing = [n for n in ADAPTER_FILES if not (out_dir / n).is_file()]
    if missing:  # a PEFT that saves another layout (e.g. .bin) would not be servable
        raise AdapterIntegrityError(
            f"peft {peft.__version__} did not write {missing} into {out_dir}; save as safetensors"
        )
    return adapter_sha256(out_dir)
