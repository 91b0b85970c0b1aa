"""LoRA adapters applied on the fly by pipeline stages, never merged into the base weights.

A PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) adds
``(alpha / r) * B(A(x))`` to the output of some Linear modules. Merging it would tie a worker to
one adapter; applying it in a forward hook keeps the base weights shared, so one stage serves many
adapters, and sessions with different adapters (or none) in the same batched pass: each hook adds
each adapter's term to the rows of the sessions that use it. A stage attaches only the tensors of
its own layers ``[start, end)``. This module loads and checks adapters; the hooks that apply them
are :class:`~dlis_market.inference.adapter_serving.StageAdapters`.

An adapter's identity is the sha256 of its canonical files (:func:`adapter_sha256`); loading checks
it when the caller expects one, and checks every tensor against the base model's shapes, target
modules and layer indices before anything runs, with typed errors
(:mod:`dlis_market.inference.errors`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from torch import nn

from dlis_market.inference.errors import (
    AdapterIntegrityError,
    AdapterMismatchError,
    UnsupportedAdapterError,
)
from dlis_market.inference.families import Family, family_for
from dlis_market.inference.manifest import Manifest, config_from_manifest
from dlis_market.types import LayerRange

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)  # the canonical files: what the identity covers
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
# PEFT options a hook adding (alpha/r) * B(A(x)) to a Linear's output cannot honour, with their
# neutral values: refused unless neutral.
_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "alpha_pattern": {},
    "rank_pattern": {},
    "fan_in_fan_out": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "exclude_modules": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
}


def _read_files(adapter_dir: Path) -> dict[str, bytes]:
    """The canonical files' bytes, read once: what is hashed is what is parsed."""
    blobs = {}
    for name in ADAPTER_FILES:
        path = adapter_dir / name
        if not path.is_file():
            raise AdapterIntegrityError(f"{path} is missing; an adapter folder holds {' and '.join(ADAPTER_FILES)}")
        blobs[name] = path.read_bytes()
    return blobs


def _identity(blobs: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(f"{name}\0{len(blobs[name])}\0{hashlib.sha256(blobs[name]).hexdigest()}\n".encode())
    return digest.hexdigest()


def adapter_sha256(adapter_dir: Path) -> str:
    """The adapter's id: sha256 over ``name NUL size NUL sha256(file) LF`` of each canonical file,
    in :data:`ADAPTER_FILES` order. README and other files PEFT writes are not part of it."""
    return _identity(_read_files(adapter_dir))


@dataclass(frozen=True)
class AdapterSpec:
    """The parts of ``adapter_config.json`` that decide what a stage computes."""

    r: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # names (suffix match), as PEFT
    layers_to_transform: tuple[int, ...] | None
    base_model_name_or_path: str | None

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)

    def targets(self, module_name: str) -> bool:
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)


def read_spec(path: Path, data: bytes) -> AdapterSpec:
    """The spec in ``adapter_config.json`` (``data``, read from ``path``), or a typed refusal."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterIntegrityError(f"{path} is not JSON ({exc}); save the adapter again") from exc
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        got = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise UnsupportedAdapterError(f"{path} has peft_type {got!r}; only LORA adapters are served")
    for key, neutral in _UNSUPPORTED.items():
        value = raw.get(key, neutral)
        if value != neutral and not (neutral in (None, {}) and not value):
            raise UnsupportedAdapterError(
                f"{path} sets {key}={value!r}; stages apply plain LoRA only ({key}={neutral!r}). "
                "Train without it, or merge the adapter into a model of its own"
            )
    r, alpha, targets, layers = raw.get("r"), raw.get("lora_alpha"), raw.get("target_modules"), None
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, int | float):
        raise AdapterIntegrityError(f"{path}: r={r!r} and lora_alpha={alpha!r} must be a positive int and a number")
    if isinstance(targets, str):  # a regex from a stranger's file can backtrack for exponential time
        raise UnsupportedAdapterError(
            f"{path}: target_modules is a regex ({targets[:80]!r}); a worker serves adapters whose "
            "target_modules list the module names (PEFT saves a list unless given a regex)"
        )
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise AdapterIntegrityError(f"{path}: target_modules={targets!r} must be a list of module names")
    raw_layers = raw.get("layers_to_transform")
    if raw_layers is not None:
        layers = (raw_layers,) if isinstance(raw_layers, int) else tuple(raw_layers)
        if not all(isinstance(i, int) and i >= 0 for i in layers):
            raise AdapterIntegrityError(f"{path}: layers_to_transform={raw_layers!r} must be layer indices")
    return AdapterSpec(
        r=r,
        alpha=float(alpha),
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=tuple(targets),
        layers_to_transform=layers,
        base_model_name_or_path=raw.get("base_model_name_or_path"),
    )


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter checked against one base model; ``tensors`` holds ``layers`` only (None: all)."""

    path: Path
    sha256: str
    spec: AdapterSpec
    model_name: str  # the base manifest's model it was checked against
    modules: dict[str, int]  # every targeted module (full-model name) -> its layer
    layers: LayerRange | None
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)  # module -> (A [r, in], B [out, r])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.tensors.values())

    @property
    def layer_indices(self) -> list[int]:
        return sorted(set(self.modules.values()))


def _base_model(manifest: Manifest) -> tuple[Family, nn.Module]:
    """The base model's family and its modules on the meta device (shapes only, no memory)."""
    config = config_from_manifest(manifest)
    family = family_for(config)
    with init_empty_weights(include_buffers=True):
        model = family.model_class()(config)
    return family, model


def _pairs(path: Path, keys: Sequence[str]) -> dict[str, dict[str, str]]:
    """module name -> {"A": key, "B": key} from PEFT's tensor names."""
    pairs: dict[str, dict[str, str]] = {}
    for key in keys:
        match = _LORA_KEY.match(key[len(PEFT_PREFIX) :]) if key.startswith(PEFT_PREFIX) else None
        if match is None:
            raise UnsupportedAdapterError(
                f"{path} holds {key!r}, which is not a plain LoRA A/B weight under {PEFT_PREFIX!r} "
                "(embedding LoRA, DoRA magnitudes and biases are not served)"
            )
        pairs.setdefault(match["module"], {})[match["which"]] = key
    for module, pair in pairs.items():
        if len(pair) != 2:
            raise AdapterIntegrityError(f"{path} has lora_{''.join(pair)} but not both A and B for {module}")
    return pairs


def load_adapter(
    adapter_dir: Path,
    manifest: Manifest,
    *,
    layers: LayerRange | None = None,
    expected_sha256: str | None = None,
) -> LoraAdapter:
    """Check the adapter against ``manifest``'s model, then load the tensors of ``layers`` (None: all).

    Raises :class:`AdapterIntegrityError` when the files do not hash to ``expected_sha256`` or are
    malformed, :class:`AdapterMismatchError` when they do not fit the base model (module, layer
    index, shape), :class:`UnsupportedAdapterError` for PEFT features stages do not apply.
    """
    blobs = _read_files(adapter_dir)
    digest = _identity(blobs)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise AdapterIntegrityError(
            f"{adapter_dir} hashes to adapter id {digest}, not the {expected_sha256} asked for (files changed "
            "or another adapter); fetch the adapter again by its CID"
        )
    spec = read_spec(adapter_dir / ADAPTER_CONFIG, blobs[ADAPTER_CONFIG])
    family, base = _base_model(manifest)
    weights = adapter_dir / ADAPTER_WEIGHTS
    try:
        stored = safetensors.torch.load(blobs[ADAPTER_WEIGHTS])
    except (SafetensorError, ValueError) as exc:
        raise AdapterIntegrityError(f"{weights} is not a readable safetensors file ({exc}); save it again") from exc
    pairs = _pairs(weights, list(stored))
    modules = _check_modules(adapter_dir, spec, family, base, manifest, pairs, stored)
    tensors = {
        m: (stored[pairs[m]["A"]].float().contiguous(), stored[pairs[m]["B"]].float().contiguous())
        for m, layer in modules.items()
        if layers is None or layers.start <= layer < layers.end
    }
    return LoraAdapter(adapter_dir, digest, spec, manifest.model_name, modules, layers, tensors)


def _check_modules(
    adapter_dir: Path,
    spec: AdapterSpec,
    family: Family,
    base: nn.Module,
    manifest: Manifest,
    pairs: dict[str, dict[str, str]],
    stored: dict[str, torch.Tensor],
) -> dict[str, int]:
    """Every LoRA pair names a Linear of the base inside a transformed layer, with A [r, in] and
    B [out, r]; every Linear the config targets has its pair. Returns module -> layer."""
    base_desc = f"{manifest.model_name} ({manifest.architecture}, {manifest.num_layers} layers)"
    where = f"adapter {adapter_dir.name} on {base_desc}"
    allowed = set(spec.layers_to_transform) if spec.layers_to_transform is not None else None
    modules: dict[str, int] = {}
    for module, pair in sorted(pairs.items()):
        layer = family.layer_of(module)
        if layer is not None and layer >= manifest.num_layers:
            raise AdapterMismatchError(
                f"{where}: {module} is in layer {layer}, but the base has layers 0..{manifest.num_layers - 1}; "
                "the adapter was trained for a deeper model"
            )
        try:
            target = base.get_submodule(module)
        except AttributeError:
            raise AdapterMismatchError(
                f"{where}: the base has no module {module}; the adapter was trained for another architecture"
            ) from None
        if layer is None:
            raise UnsupportedAdapterError(
                f"{where}: {module} is outside the decoder layers; stages apply LoRA to layer modules only"
            )
        if allowed is not None and layer not in allowed:
            raise AdapterMismatchError(
                f"{where}: {module} is in layer {layer}, outside the adapter's own layers_to_transform "
                f"{spec.layers_to_transform}; the files disagree, save the adapter again"
            )
        if not isinstance(target, nn.Linear):
            raise UnsupportedAdapterError(f"{where}: {module} is a {type(target).__name__}, not a Linear")
        a_shape, b_shape = tuple(stored[pair["A"]].shape), tuple(stored[pair["B"]].shape)
        want_a, want_b = (spec.r, target.in_features), (target.out_features, spec.r)
        if a_shape != want_a or b_shape != want_b:
            raise AdapterMismatchError(
                f"{where}: {module} has lora_A {list(a_shape)} and lora_B {list(b_shape)}, the base needs "
                f"{list(want_a)} and {list(want_b)} (r={spec.r}); the adapter was trained for another base shape"
            )
        modules[module] = layer
    expected = {
        name
        for name, mod in base.named_modules()
        if isinstance(mod, nn.Linear)
        and spec.targets(name)
        and (layer := family.layer_of(name)) is not None
        and (allowed is None or layer in allowed)
    }
    missing = sorted(expected - set(modules))
    if missing:
        raise AdapterIntegrityError(
            f"{where}: {ADAPTER_WEIGHTS} lacks the LoRA weights of {len(missing)} modules its config targets "
            f"(e.g. {missing[0]}); save the adapter again"
        )
    return modules
