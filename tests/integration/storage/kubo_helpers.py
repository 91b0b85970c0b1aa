"""Helpers of the storage integration tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from dlis_market.storage.daemon import EmbeddedDaemon

NodeFactory = Callable[[str], EmbeddedDaemon]


def write_shards(root: Path, sizes: dict[str, int]) -> Path:
    """A shard folder: random files plus a manifest.json listing path/size/sha256."""
    files = []
    for rel, size in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with path.open("wb") as out:
            left = size
            while left:
                block = os.urandom(min(left, 1 << 20))
                out.write(block)
                digest.update(block)
                left -= len(block)
        files.append({"path": rel, "size": size, "sha256": digest.hexdigest()})
    (root / "manifest.json").write_text(json.dumps({"num_layers": 2, "files": files}))
    return root


def tiny_llama_folder(path: Path) -> Path:
    """A random 4-layer Llama saved as a Hugging Face folder (seeded: the same bytes every time)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(7)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path
