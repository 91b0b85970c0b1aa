"""Telemetry intake: forged, duplicate, superseded, stale, future, unregistered, oversized reports are refused."""

from __future__ import annotations

import pytest
import zstandard
from eth_account import Account

from dlis_market.oracle.telemetry import TelemetryIntake
from dlis_market.protocol.errors import TelemetryRefusedError
from dlis_market.protocol.telemetry import SignedTelemetry, TelemetryReport, encode_telemetry, oracle_domain

from .conftest import NOW, metrics


def _intake(domain, **kw) -> TelemetryIntake:  # type: ignore[no-untyped-def]
    args = {
        "max_age_s": 300.0,
        "max_skew_s": 30.0,
        "max_bytes": 64 << 10,
        "max_decompressed_bytes": 256 << 10,
        "clock": lambda: float(NOW),
    }
    args.update(kw)
    return TelemetryIntake(domain, **args)  # type: ignore[arg-type]


def _refused(intake: TelemetryIntake, blob: bytes) -> str:
    with pytest.raises(TelemetryRefusedError) as err:
        intake.submit(blob)
    return err.value.reason


def test_valid_report_accepted_and_roundtrips(domain, make_report) -> None:
    intake = _intake(domain)
    signed = make_report(latencies_ms=(12.5, 13.0), sessions_ok=3)
    got = intake.submit(encode_telemetry(signed))
    assert got == signed
    assert intake.counts["accepted"] == 1
    assert intake.drain() == [signed]
    assert intake.drain() == []


def test_forged_signature_refused(domain, make_report, node_key) -> None:
    intake = _intake(domain)
    other = Account.from_key(b"\x22" * 32)
    good = make_report()
    # claims node_key's address, signed by another key
    forged = make_report(key=other)
    forged = SignedTelemetry(report=good.report, signature=forged.signature)
    assert _refused(intake, encode_telemetry(forged)) == "forged"
    # metrics changed after signing
    tampered = SignedTelemetry(
        report=good.report.model_copy(update={"metrics": metrics(measured_tps=9999.0)}), signature=good.signature
    )
    assert _refused(intake, encode_telemetry(tampered)) == "forged"
    # signed for another chain's oracle
    elsewhere = oracle_domain(1, domain.verifying_contract)
    assert _refused(_intake(elsewhere), encode_telemetry(good)) == "forged"
    assert intake.counts["forged"] == 2 and intake.counts["accepted"] == 0


def test_unsigned_or_garbage_refused(domain, make_report) -> None:
    intake = _intake(domain)
    good = make_report()
    unsigned = good.model_dump()
    unsigned.pop("signature")
    blob = zstandard.ZstdCompressor().compress(str(unsigned).encode())
    assert _refused(intake, blob) == "malformed"
    assert _refused(intake, b"not zstd at all") == "malformed"
    zero_sig = SignedTelemetry(report=good.report, signature="0x" + "00" * 65)
    assert _refused(intake, encode_telemetry(zero_sig)) == "forged"
    assert intake.counts["malformed"] == 2


def test_replay_refused(domain, make_report) -> None:
    intake = _intake(domain)
    r1 = encode_telemetry(make_report(seq=5))
    intake.submit(r1)
    assert _refused(intake, r1) == "duplicate"  # the same report again
    assert _refused(intake, encode_telemetry(make_report(seq=4))) == "superseded"  # older, never taken
    intake.submit(encode_telemetry(make_report(seq=6)))
    assert intake.counts == {**intake.counts, "accepted": 2, "duplicate": 1, "superseded": 1}


def test_restarted_intake_seeded_with_last_seq_refuses_replay(domain, make_report) -> None:
    blob = encode_telemetry(make_report(seq=5))
    node = make_report().report.node
    assert _refused(_intake(domain, last_seq={node: 5}), blob) == "superseded"


def test_stale_and_future_refused_without_consuming_seq(domain, make_report) -> None:
    intake = _intake(domain)
    assert _refused(intake, encode_telemetry(make_report(seq=1, timestamp=NOW - 301))) == "stale"
    assert _refused(intake, encode_telemetry(make_report(seq=2, timestamp=NOW + 31))) == "future"
    # neither advanced the node's seq
    intake.submit(encode_telemetry(make_report(seq=1, timestamp=NOW - 299)))
    assert intake.counts["stale"] == 1 and intake.counts["future"] == 1


def test_unregistered_refused(domain, make_report) -> None:
    intake = _intake(domain, is_registered=lambda node: False)
    assert _refused(intake, encode_telemetry(make_report())) == "unregistered"


def test_size_limits(domain, make_report) -> None:
    blob = encode_telemetry(make_report())
    assert _refused(_intake(domain, max_bytes=len(blob) - 1), blob) == "oversized"
    assert _refused(_intake(domain, max_decompressed_bytes=100), blob) == "oversized"
    bomb = zstandard.ZstdCompressor().compress(b"{" * (10 << 20))
    assert len(bomb) < 64 << 10
    assert _refused(_intake(domain), bomb) == "oversized"


def test_strict_wire_model(node_key) -> None:
    with pytest.raises(ValueError):
        TelemetryReport.model_validate(
            {"node": node_key.address, "seq": "1", "timestamp": NOW, "metrics": metrics().model_dump()}
        )
    with pytest.raises(ValueError):
        metrics(extra_field=1)
    with pytest.raises(ValueError):
        metrics(measured_tps=float("inf"))
    with pytest.raises(ValueError):
        metrics(latencies_ms=(float("nan"),))
    assert metrics().model_config["strict"] and metrics().model_config["frozen"]
