"""Fixtures: tiny random models of each family, and the real SmolLM2 imported once into a cache."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dlis_market.inference.importer import import_model

from .reference import tiny_configs

# Bump when the import format changes so stale caches are not reused.
SMOLLM2_CACHE = Path(tempfile.gettempdir()) / "dlis-test-cache" / "v1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_model_dir(family)`` -> an HF folder with a random model of that family (made once)."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            torch.manual_seed(1234)
            model = AutoModelForCausalLM.from_config(tiny_configs()[family])
            with torch.no_grad():  # larger weights than the default init, so tokens vary
                for param in model.parameters():
                    if param.ndim >= 2:
                        param.normal_(0.0, 0.15)
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            model.save_pretrained(path)
            made[family] = path
        return made[family]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as an HF folder (imported once, then reused across runs)."""
    return import_model("smollm2-135m", SMOLLM2_CACHE / "models", SMOLLM2_CACHE / "cache")
