"""Models the broker serves: manifest + tokenizer (and chat template) from local shard folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlis_market.broker.problems import prompt_too_long, unknown_model
from dlis_market.inference.manifest import Manifest, load_manifest


@dataclass
class ServedModel:
    name: str
    model_id: str
    manifest: Manifest
    shard_dir: Path
    tokenizer: Any

    @property
    def context_length(self) -> int:
        cfg = self.manifest.config
        return int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048)

    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        return () if eos is None else (int(eos),)

    def encode_prompt(self, prompt: str | None, messages: list[dict[str, str]] | None) -> list[int]:
        if messages is not None:
            if getattr(self.tokenizer, "chat_template", None):
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
                    ids = ids["input_ids"]
                return [int(i) for i in ids]
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return [int(i) for i in self.tokenizer(prompt or "")["input_ids"]]

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens == 0:
            raise prompt_too_long(0, self.context_length) from None
        if prompt_tokens + max_tokens > self.context_length:
            raise prompt_too_long(prompt_tokens + max_tokens, self.context_length)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


class ModelCatalog:
    def __init__(self, models: dict[str, ServedModel]):
        self.models = models

    @classmethod
    def from_shard_dirs(cls, dirs: list[Path]) -> ModelCatalog:
        from transformers import AutoTokenizer

        models: dict[str, ServedModel] = {}
        for d in dirs:
            manifest = load_manifest(d)
            tok = AutoTokenizer.from_pretrained(str(d))
            models[manifest.model_name] = ServedModel(manifest.model_name, manifest.model_id, manifest, d, tok)
        return cls(models)

    def get(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise unknown_model(name, sorted(self.models))
        return model
