"""Architecture families. Adding one = one module here plus one line in ``FAMILIES``."""

from __future__ import annotations

from transformers import PretrainedConfig

from dlis_market.inference.errors import UnsupportedArchitectureError
from dlis_market.inference.families.base import Family
from dlis_market.inference.families.gemma3 import Gemma3Family
from dlis_market.inference.families.gpt2 import GPT2Family
from dlis_market.inference.families.llama import LlamaFamily

FAMILIES: tuple[Family, ...] = (LlamaFamily(), GPT2Family(), Gemma3Family())


def family_for(config: PretrainedConfig) -> Family:
    """The family serving ``config.model_type``; a clear error listing the supported ones if none."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} has no family module (supported: {supported}); add one in "
        "dlis_market/inference/families/ and list it in FAMILIES"
    )


__all__ = ["FAMILIES", "Family", "family_for"]
