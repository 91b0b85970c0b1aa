"""The oracle restarts from its state after a crash in the middle of writing it (real Anvil, the
real service): a report log cut short mid-line, a privacy account torn mid-write."""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import pytest

from dlis_market.chain.devnet import LocalMarket
from dlis_market.oracle import state_files
from dlis_market.oracle.observations import ObservationBatch, StageObservation
from dlis_market.oracle.service import OracleService
from dlis_market.oracle.telemetry import TelemetryMetrics, TelemetryReport, encode_telemetry, sign_telemetry
from dlis_market.settings import Settings

UNIT = 10**18
EPOCH_S = 600
EPOCH = 3_000_000
START = EPOCH * EPOCH_S


class Crash(BaseException):
    """The process dies here."""


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _service(market: LocalMarket, tmp_path: Path, clock: Clock) -> OracleService:
    data = market.settings.model_dump()
    data["oracle"].update({"state_dir": tmp_path / "oracle", "epoch_s": EPOCH_S, "heartbeat_interval_s": 60.0})
    return OracleService(Settings.model_validate(data), market.client, market.oracle, clock=clock, seed=0)


def _report(service: OracleService, key, seq: int, ts: float) -> bytes:  # type: ignore[no-untyped-def]
    metrics = TelemetryMetrics(uptime_s=60.0 * seq, advertised_tps=50.0, measured_tps=40.0, free_kv_slots=2)
    report = TelemetryReport(node=key.address, seq=seq, timestamp=int(ts), metrics=metrics)
    return encode_telemetry(sign_telemetry(key.key, service.domain, report))


def test_restart_after_a_crash_mid_append(market: LocalMarket, tmp_path: Path) -> None:
    node = market.enroll_node(market.new_funded_account(300 * UNIT), stake=300 * UNIT)
    clock = Clock(START + 30)
    service = _service(market, tmp_path, clock)
    service.submit_telemetry(_report(service, node, 1, clock.now))
    clock.now += 60
    service.submit_telemetry(_report(service, node, 2, clock.now))
    log = tmp_path / "oracle" / "reports" / f"{EPOCH}.jsonl"
    whole = log.read_text()
    with log.open("a") as fh:  # the third report was being appended when the process died
        fh.write(whole.splitlines()[-1][: len(whole) // 3])
    again = _service(market, tmp_path, clock)
    assert [r.telemetry.report.seq for r in again._pending] == [1, 2]
    clock.now += 60  # it keeps going: the next report is appended after the torn one and read back
    again.submit_telemetry(_report(again, node, 3, clock.now))
    assert [r.telemetry.report.seq for r in _service(market, tmp_path, clock)._pending] == [1, 2, 3]


def test_privacy_accounts_survive_a_crash_mid_write(market: LocalMarket, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    node = market.enroll_node(market.new_funded_account(300 * UNIT), stake=300 * UNIT)
    clock = Clock(START + 30)
    service = _service(market, tmp_path, clock)
    service.submit_telemetry(_report(service, node, 1, clock.now))
    clock.now = START + EPOCH_S + 30
    assert service.close_epoch(EPOCH) is not None
    privacy = tmp_path / "oracle" / "privacy.json"
    before = privacy.read_text()
    service.submit_telemetry(_report(service, node, 2, clock.now))

    real_replace, real_write_text = os.replace, pathlib.Path.write_text

    def torn_write_text(self: Path, data: str, *args: object, **kw: object) -> int:
        if self.name == "privacy.json":  # how a plain write dies: truncated, half written
            real_write_text(self, data[: len(data) // 2])
            raise Crash
        return real_write_text(self, data, *args, **kw)  # type: ignore[arg-type]

    def dying_replace(src: str, dst: str | Path) -> None:
        if Path(dst).name == "privacy.json":
            raise Crash
        real_replace(src, dst)

    monkeypatch.setattr(pathlib.Path, "write_text", torn_write_text)
    monkeypatch.setattr(state_files.os, "replace", dying_replace)
    clock.now = START + 2 * EPOCH_S + 30
    with pytest.raises(Crash):
        service.close_epoch(EPOCH + 1)
    monkeypatch.undo()
    assert privacy.read_text() == before  # the previous accounts, whole
    again = _service(market, tmp_path, clock)
    assert again.accountant.to_json() == before


def test_observations_of_an_open_epoch_survive_a_restart(market: LocalMarket, tmp_path: Path) -> None:
    node = market.enroll_node(market.new_funded_account(300 * UNIT), stake=300 * UNIT)
    clock = Clock(START + 30)
    service = _service(market, tmp_path, clock)
    obs = StageObservation(
        node=node.address, job_id="0x" + "07" * 32, start=0, end=4, tokens=16, latency_ms=800, ok=True
    ).signed_by_runner(market.oracle.key, service.domain)
    assert service.report_observations(ObservationBatch(observations=(obs,))) == 1
    again = _service(market, tmp_path, clock)
    assert again._observed[EPOCH] == [obs]
    assert again.report_observations(ObservationBatch(observations=(obs,))) == 0  # still counted once
    clock.now = START + EPOCH_S + 200
    record = again.close_epoch(EPOCH)
    assert record is not None and [leaf.node for leaf in record.leaves] == [node.address]
