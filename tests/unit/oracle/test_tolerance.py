"""The tolerance table sits between honest run-to-run differences and cheating (heavy: ~100 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlis_market.protocol.outputs import TOLERANCES


@pytest.mark.heavy
def test_tolerances_separate_honest_from_cheating(tmp_path: Path) -> None:
    from .tolerance_measure import DTYPES, measure  # torch + transformers: only when this runs

    result = measure(tmp_path, prompts=2)
    for dtype in DTYPES:
        tol = TOLERANCES[dtype].max_rel_diff
        row = result[dtype]
        assert row["honest_max"] < tol / 10, (dtype, row)  # an order of magnitude of headroom
        assert row["wrong_input_min"] > 2 * tol, (dtype, row)
    # serving a cheaper quantization than claimed is caught at fp32 (any) and bf16/int8 (nf4)
    assert min(v for k, v in result["fp32"].items() if k.startswith("served_")) > TOLERANCES["fp32"].max_rel_diff
    assert result["bf16"]["served_nf4"] > TOLERANCES["bf16"].max_rel_diff
    assert result["int8"]["served_nf4"] > TOLERANCES["int8"].max_rel_diff
