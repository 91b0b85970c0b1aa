"""Epoch records: leaves commit to score and report digests; stored proofs verify offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from eth_abi import encode
from eth_utils import keccak

from dlis_market.oracle.epochs import EpochLeaf, EpochRecord, build_record, telemetry_digest
from dlis_market.oracle.errors import ProofNotFoundError
from dlis_market.oracle.privacy import BudgetAccountant, release_aggregates
from dlis_market.oracle.store import DB_FILE, OracleStore

NODES = ["0x" + f"{i:040x}" for i in range(1, 6)]


def _record():  # type: ignore[no-untyped-def]
    scores = {n: 2000 * i for i, n in enumerate(NODES)}
    digests = {n: [bytes([i]) * 32] for i, n in enumerate(NODES)}
    return build_record(4, scores, digests)


def save_posted(store: OracleStore, record: EpochRecord) -> None:
    """Record ``record`` as posted (intent, then finished with empty aggregates)."""
    store.intend_epoch(record, {})
    accountant = BudgetAccountant(1.0, 1)
    empty = release_aggregates(record.epoch, {}, 1.0, 1.0, accountant, np.random.default_rng(0))
    store.finish_epoch(record, empty, accountant)


def test_leaf_is_oz_standard_leaf_of_the_abi_encoded_fields() -> None:
    leaf = EpochLeaf(node=NODES[0], epoch=4, score_bps=123, reports=2, telemetry_digest="0x" + "11" * 32)
    encoded = encode(
        ["address", "uint64", "uint16", "uint32", "bytes32"], [NODES[0], 4, 123, 2, bytes.fromhex("11" * 32)]
    )
    assert leaf.hash() == keccak(keccak(encoded))


def test_stored_proofs_verify_and_tampering_fails(tmp_path: Path) -> None:
    store = OracleStore(f"sqlite:///{tmp_path / DB_FILE}")
    save_posted(store, _record())
    assert store.posted_epochs() == [4]
    for node in NODES:
        proof = store.proof(node, 4)
        assert proof.verifies_offline()
        assert (
            proof.leaf.telemetry_digest == "0x" + telemetry_digest([bytes.fromhex(proof.report_digests[0][2:])]).hex()
        )
    tampered = proof.model_copy(update={"report_digests": ("0x" + "ff" * 32,)})
    assert not tampered.verifies_offline()
    with pytest.raises(ProofNotFoundError, match="not scored"):
        store.proof("0x" + "99" * 20, 4)
    with pytest.raises(ProofNotFoundError, match="no posted epoch 5"):
        store.proof(NODES[0], 5)


def test_cli_proof_offline(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from dlis_market.cli.oracle import app

    save_posted(OracleStore(f"sqlite:///{tmp_path / 'oracle' / DB_FILE}"), _record())
    env = {"DLIS_HOME": str(tmp_path)}
    out = CliRunner().invoke(app, ["proof", NODES[2], "4", "--offline", "--json"], env=env)
    assert out.exit_code == 0, out.output
    shown = json.loads(out.stdout)
    assert shown["verifies_offline"] and shown["leaf"]["score_bps"] == 4000 and "verifies_on_chain" not in shown
    missing = CliRunner().invoke(app, ["proof", NODES[2], "9", "--offline"], env=env)
    assert missing.exit_code == 1 and "no posted epoch 9" in missing.output
