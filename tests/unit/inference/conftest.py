"""Fixtures: tiny random models of each family (the real SmolLM2 is in tests/unit/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from .reference import tiny_configs


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
