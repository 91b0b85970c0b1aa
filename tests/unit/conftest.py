"""Fixtures shared by the unit tests: the real SmolLM2 imported once into a cache."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from dlis_market.inference.importer import import_model

# Bump when the import format changes so stale caches are not reused.
SMOLLM2_CACHE = Path(tempfile.gettempdir()) / "dlis-test-cache" / "v1"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as an HF folder (imported once, then reused across runs)."""
    return import_model("smollm2-135m", SMOLLM2_CACHE / "models", SMOLLM2_CACHE / "cache")
