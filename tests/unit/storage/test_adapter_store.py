"""The local adapter store names files by adapter id: ids that are not 64 hex digits are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dlis_market.storage.adapter_store import AdapterRecord, AdapterStore
from dlis_market.storage.errors import ManifestError


def record(adapter_id: str) -> AdapterRecord:
    return AdapterRecord(
        adapter_id=adapter_id, name="qv", base_model="tiny", base_manifest_sha256="ab" * 32, base_num_layers=4,
        r=8, lora_alpha=16.0, target_modules=["q_proj"], layers=[0, 1], files=[],
    )  # fmt: skip


def test_ids_that_could_leave_the_store_are_refused(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters")
    good = record("c0" * 32)
    store.put(good)
    assert store.get("C0" * 32) == good
    (tmp_path / "secret.json").write_text("{}")
    with pytest.raises(ManifestError, match="not an adapter id"):
        store.get("../secret")
    with pytest.raises(ValidationError):
        record("../../etc/passwd")
