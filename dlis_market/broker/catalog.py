"""Models the broker serves: manifest + tokenizer (and chat template) from local shard folders.

With a chain registry, a model is served only when its local manifest is the one the chain
records for its model id (same manifest sha256 and layer count): jobs of a squatted or re-pointed
model id would be routed over shards the chain does not vouch for, or fail to settle.

A LoRA adapter is served under ``"<base>:<adapter>"`` (:mod:`dlis_market.protocol.adapters`):
the chain record of that name in the publisher's namespace gives its CID and id; the job routes
over the base's workers and is authorized and settled under the adapter's model id.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlis_market.broker.problems import prompt_too_long, unknown_model
from dlis_market.errors import BrokerError
from dlis_market.inference.manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file
from dlis_market.protocol.adapters import AdapterRef, split_model
from dlis_market.types import model_id

if TYPE_CHECKING:
    from dlis_market.chain.node_registry import NodeRegistry


class ManifestMismatchError(BrokerError):
    """A local model's manifest is not the one the chain records for its model id."""


def check_against_chain(manifest: Manifest, shard_dir: Path, registry: NodeRegistry, publisher: str) -> None:
    """Raise :class:`ManifestMismatchError` unless the chain's latest version of the model
    ``publisher`` published under the manifest's name has this manifest's sha256 and layer count."""
    local_sha = sha256_file(shard_dir / MANIFEST_NAME)
    mid = model_id(manifest.model_name, publisher)
    record = registry.get_model(bytes.fromhex(mid[2:]))
    if record is None:
        raise ManifestMismatchError(
            f"model {manifest.model_name} is not published by {publisher} in NodeRegistry {registry.address} "
            f"(model id {mid}), so its jobs cannot settle; publish it (`dlis model publish`), set "
            f"chain.model_publisher to the account that published it, or drop {shard_dir}"
        )
    chain_sha = record.manifest_sha256.hex()
    if chain_sha != local_sha or record.num_layers != manifest.num_layers:
        raise ManifestMismatchError(
            f"model {manifest.model_name} ({mid}): local manifest {shard_dir / MANIFEST_NAME} has "
            f"sha256 {local_sha} and {manifest.num_layers} layers, but the chain's version {record.version} "
            f"(publisher {record.publisher}) has sha256 {chain_sha} and {record.num_layers} layers; fetch the "
            "published shards (`dlis model fetch`) or serve the model under a name you published"
        )


def load_tokenizer(folder: Path) -> Any:
    """``AutoTokenizer.from_pretrained(folder)``, without loading the model's config class.

    AutoTokenizer reads ``config.json`` through the model's own config class only to learn the
    model type, and that class's module pulls in transformers' modeling integrations (torch's
    distributed tensors, kernel hubs): ~1 s of a broker's start on 2 cores, for a process that never
    builds a model. The same file read into the generic config class carries the same model type
    (and the folder as its name), so AutoTokenizer picks the same tokenizer class; when the folder
    has no ``config.json``, AutoTokenizer runs as it is."""
    import json

    from transformers import AutoTokenizer, PretrainedConfig

    config_file = folder / "config.json"
    if not config_file.is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    config = PretrainedConfig.from_dict(json.loads(config_file.read_text()))
    config._name_or_path = str(folder)
    return AutoTokenizer.from_pretrained(str(folder), config=config)


@dataclass
class ServedModel:
    name: str
    model_id: str
    manifest: Manifest
    shard_dir: Path
    tokenizer: Any
    adapter: AdapterRef | None = None  # a LoRA adapter over the base model (name "base:adapter")

    @property
    def base(self) -> str:
        """The model whose workers serve the job (the name itself unless it is an adapter)."""
        return self.manifest.model_name

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
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                return self._encode(str(text), special_tokens=False)  # as apply_chat_template(tokenize=True)
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return self._encode(prompt or "", special_tokens=True)

    def _encode(self, text: str, special_tokens: bool) -> list[int]:
        """``text``'s token ids, as ``tokenizer(text, add_special_tokens=...)`` gives them.

        A fast tokenizer's Rust core is called directly (``backend_tokenizer.encode``): transformers'
        wrapper goes through ``encode_batch``, which costs ~2.5x as much for a short prompt and
        releases the GIL, so on a busy broker the event loop then waits for it behind the ledger's
        threads (bench/broker_admission.py). The wrapper is used when the core would truncate or
        pad, which the wrapper turns off first; tests/unit/broker/test_catalog_encode.py holds
        both equal."""
        core = getattr(self.tokenizer, "backend_tokenizer", None)
        if core is not None and core.truncation is None and core.padding is None:
            return list(core.encode(text, add_special_tokens=special_tokens).ids)
        return [int(i) for i in self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]]

    def check_length(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens == 0:
            raise prompt_too_long(0, self.context_length) from None
        if prompt_tokens + max_tokens > self.context_length:
            raise prompt_too_long(prompt_tokens + max_tokens, self.context_length)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


ADAPTER_CACHE_S = 30.0  # a re-published adapter (a new version on chain) is seen within this


class ModelCatalog:
    def __init__(
        self, models: dict[str, ServedModel], publisher: str | None = None, registry: NodeRegistry | None = None
    ):
        self.models = models
        self.publisher = publisher
        self.registry = registry
        self._adapters: dict[str, tuple[float, ServedModel]] = {}

    @classmethod
    def from_shard_dirs(cls, dirs: list[Path], publisher: str, registry: NodeRegistry | None = None) -> ModelCatalog:
        """Load each shard folder as ``publisher``'s model of the manifest's name; with
        ``registry``, refuse (:class:`ManifestMismatchError`) a model whose manifest is not the
        chain's latest for that model id."""
        models: dict[str, ServedModel] = {}
        for d in dirs:
            manifest = load_manifest(d)
            if registry is not None:
                check_against_chain(manifest, d, registry, publisher)
            tok = load_tokenizer(d)
            mid = model_id(manifest.model_name, publisher)
            models[manifest.model_name] = ServedModel(manifest.model_name, mid, manifest, d, tok)
        return cls(models, publisher, registry)

    def get(self, name: str) -> ServedModel:
        model = self.find(name)
        if model is None:
            raise unknown_model(name, sorted(self.models))
        return model

    @property
    def adapter_names(self) -> list[str]:
        """The adapters resolved so far (named by a job, or offered at start): what /v1/models lists
        besides the base models (the chain holds name hashes only, so adapters cannot be enumerated)."""
        return sorted(self._adapters)

    def find(self, name: str) -> ServedModel | None:
        """A served model, or an adapter over one that the chain records; None otherwise."""
        model = self.models.get(name)
        if model is not None:
            return model
        base_name, adapter = split_model(name)
        base = self.models.get(base_name)
        if adapter is None or base is None or self.registry is None or self.publisher is None:
            return None
        hit = self._adapters.get(name)
        if hit is not None and time.monotonic() - hit[0] < ADAPTER_CACHE_S:
            return hit[1]
        mid = model_id(name, self.publisher)
        record = self.registry.get_model(bytes.fromhex(mid[2:]))
        if record is None or record.num_layers != base.num_layers:
            return None  # not published (or not over this base's layers): unknown
        ref = AdapterRef(name=name, model_id=record.model_id, cid=record.manifest_cid,
                         adapter_id=record.manifest_sha256.hex())  # fmt: skip
        served = dataclasses.replace(base, name=name, model_id=mid, adapter=ref)
        self._adapters[name] = (time.monotonic(), served)
        return served
