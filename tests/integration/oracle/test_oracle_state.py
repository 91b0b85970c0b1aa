"""The oracle restarts from its database after a crash at any point of an intake (real Anvil, the
real service, a real SQLite file): each intake is all or nothing, and what was sent to the chain
before the crash is reconciled with the chain, never sent twice."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import Transaction
from sqlalchemy.orm import Session

from dlis_market.chain.devnet import LocalMarket
from dlis_market.oracle.errors import EvidenceRefusedError
from dlis_market.oracle.service import OracleService
from dlis_market.oracle.store import EpochStatus, OracleStore
from dlis_market.oracle.telemetry import TelemetryIntake
from dlis_market.protocol.errors import TelemetryRefusedError
from dlis_market.protocol.observations import ObservationBatch, StageObservation
from dlis_market.protocol.telemetry import TelemetryMetrics, TelemetryReport, encode_telemetry, sign_telemetry
from dlis_market.settings import Settings
from tests.unit.oracle.evidence_helpers import make_evidence, reference_output

UNIT = 10**18
EPOCH_S = 600
EPOCH = 3_000_000
START = EPOCH * EPOCH_S


class Crash(BaseException):
    """The process dies here (not an Exception: nothing may catch it and carry on)."""


def _crash(*_args: object, **_kw: object) -> None:
    raise Crash


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


def _posted_on_chain(market: LocalMarket) -> list[int]:
    return [int(e) for e in market.reputation().contract.functions.epochs().call()]


def test_a_report_is_kept_with_its_seq_or_not_at_all(market: LocalMarket, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    node = market.enroll_node(market.new_funded_account(300 * UNIT), stake=300 * UNIT)
    clock = Clock(START + 30)
    service = _service(market, tmp_path, clock)
    service.submit_telemetry(_report(service, node, 1, clock.now))
    clock.now += 60
    third, fourth = _report(service, node, 3, clock.now), _report(service, node, 4, clock.now)
    service.submit_telemetry(_report(service, node, 2, clock.now))
    monkeypatch.setattr(Transaction, "commit", _crash)  # dies before the report's transaction commits
    with pytest.raises(Crash):
        service.submit_telemetry(third)
    monkeypatch.undo()
    again = _service(market, tmp_path, clock)
    assert [r.telemetry.report.seq for r in again._pending] == [1, 2]
    assert again.intake.last_seq[node.address] == 2
    again.submit_telemetry(third)  # never answered, so the worker's retry is taken, once
    monkeypatch.setattr(TelemetryIntake, "accept", _crash)  # dies after the commit, before answering
    with pytest.raises(Crash):
        again.submit_telemetry(fourth)
    monkeypatch.undo()
    last = _service(market, tmp_path, clock)
    assert [r.telemetry.report.seq for r in last._pending] == [1, 2, 3, 4]
    with pytest.raises(TelemetryRefusedError, match="was accepted already"):  # the same report again
        last.submit_telemetry(fourth)
    assert [r.telemetry.report.seq for r in last._pending] == [1, 2, 3, 4]


def test_a_crash_after_posting_finishes_the_epoch_once(market: LocalMarket, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    node = market.enroll_node(market.new_funded_account(300 * UNIT), stake=300 * UNIT)
    clock = Clock(START + 30)
    service = _service(market, tmp_path, clock)
    service.submit_telemetry(_report(service, node, 1, clock.now))
    clock.now = START + EPOCH_S + 30
    assert service.close_epoch(EPOCH) is not None
    before = service.accountant.to_json()
    service.submit_telemetry(_report(service, node, 2, clock.now))
    # postEpoch went through; the transaction that marks it posted and spends the budget dies
    monkeypatch.setattr(OracleStore, "finish_epoch", _crash)
    clock.now = START + 2 * EPOCH_S + 30
    with pytest.raises(Crash):
        service.close_epoch(EPOCH + 1)
    monkeypatch.undo()
    assert _posted_on_chain(market) == [EPOCH, EPOCH + 1]
    store = OracleStore(service.store.url)
    assert store.epoch_status(EPOCH + 1) == EpochStatus.POSTING and store.aggregates(EPOCH + 1) is None
    assert store.accountant(service.config.dp_budget, service.config.dp_budget_window_epochs).to_json() == before

    again = _service(market, tmp_path, clock)  # finishes it from the chain's root, posts nothing
    assert _posted_on_chain(market) == [EPOCH, EPOCH + 1]
    assert store.epoch_status(EPOCH + 1) == EpochStatus.POSTED
    assert store.aggregates(EPOCH + 1) is not None
    assert [f for f, _ in store.releases(EPOCH + 1)] == ["availability", "latency_histogram", "capacity"]
    eps = service.config.dp_epsilon
    assert again.accountant.account(node.address, EPOCH + 1)["spent"] == pytest.approx(2 * eps)
    assert again.close_epoch(EPOCH + 1) is not None  # closed once: the stored record, nothing spent again
    assert again.accountant.account(node.address, EPOCH + 1)["spent"] == pytest.approx(2 * eps)
    assert again.store.proof(node.address, EPOCH + 1).verifies_offline()


def test_a_crash_before_posting_posts_the_recorded_root(market: LocalMarket, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    node = market.enroll_node(market.new_funded_account(300 * UNIT), stake=300 * UNIT)
    clock = Clock(START + 30)
    service = _service(market, tmp_path, clock)
    service.submit_telemetry(_report(service, node, 1, clock.now))
    clock.now = START + EPOCH_S + 30
    monkeypatch.setattr(type(service.reputation), "post_epoch", _crash)
    with pytest.raises(Crash):
        service.close_epoch(EPOCH)
    monkeypatch.undo()
    intent = OracleStore(service.store.url).epoch_intent(EPOCH)
    assert intent is not None and _posted_on_chain(market) == []
    again = _service(market, tmp_path, clock)
    assert _posted_on_chain(market) == [EPOCH]
    assert market.reputation().telemetry_root(EPOCH) == bytes.fromhex(intent.record.root[2:])
    assert again.posted_epochs == 1 and again.latest_aggregates() is not None


def test_a_crash_around_the_slash_slashes_once_and_counts_once(
    market: LocalMarket, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    ops = [market.new_funded_account(300 * UNIT) for _ in range(2)]
    accused, checker = (market.enroll_node(op, stake=300 * UNIT) for op in ops)
    clock = Clock(START + 30)
    service = _service(market, tmp_path, clock)
    out = reference_output()
    domain = market.market().domain()

    def evidence(job: bytes):  # type: ignore[no-untyped-def]
        return make_evidence(
            accused, checker, domain, out + 1.0, out, job=job, runner=market.oracle, oracle_domain=service.domain
        )

    slash = service.config.slash_amount
    # 1. dies after the chain took the slash, before its result was recorded
    monkeypatch.setattr(OracleStore, "finish_slash", _crash)
    with pytest.raises(Crash):
        service.report_spot_check(evidence(b"\x01" * 32))
    monkeypatch.undo()
    assert market.staking().info(ops[0].address).active == 300 * UNIT - slash
    # 2. dies after recording the intent, before sending the slash
    monkeypatch.setattr(type(service.staking), "slash", _crash)
    with pytest.raises(Crash):
        service.report_spot_check(evidence(b"\x02" * 32))
    monkeypatch.undo()
    assert market.staking().info(ops[0].address).active == 300 * UNIT - slash

    again = _service(market, tmp_path, clock)  # reconciles both with the chain's evidenceUsed
    assert market.staking().info(ops[0].address).active == 300 * UNIT - 2 * slash
    assert again.slashes == 2 and again.store.open_slashes() == []
    checks = again._checks[EPOCH]
    assert checks[accused.address] == [0, 2] and checks[checker.address] == [2, 0]  # [passed, failed]
    for job in (b"\x01" * 32, b"\x02" * 32):  # posted again: refused, nothing counted again
        with pytest.raises(EvidenceRefusedError, match="already used"):
            again.report_spot_check(evidence(job))
    assert market.staking().info(ops[0].address).active == 300 * UNIT - 2 * slash
    assert dict(_service(market, tmp_path, clock)._checks[EPOCH]) == dict(checks)


def test_observations_of_an_open_epoch_survive_a_restart(market: LocalMarket, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    node = market.enroll_node(market.new_funded_account(300 * UNIT), stake=300 * UNIT)
    clock = Clock(START + 30)
    service = _service(market, tmp_path, clock)

    def observed(job: int) -> StageObservation:
        return StageObservation(
            node=node.address, job_id="0x" + f"{job:064x}", start=0, end=4, tokens=16, latency_ms=800, ok=True
        ).signed_by_runner(market.oracle.key, service.domain)

    obs = observed(7)
    assert service.report_observations(ObservationBatch(observations=(obs,))) == 1
    # a batch whose transaction dies halfway keeps none of it
    real_add = Session.add
    added: list[object] = []

    def dying_add(self: Session, row: object, *a: object, **kw: object) -> None:
        added.append(row)
        if len(added) == 3:  # the second observation's counted key: the first one is in the batch already
            raise Crash
        real_add(self, row, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Session, "add", dying_add)
    with pytest.raises(Crash):
        service.report_observations(ObservationBatch(observations=(observed(8), observed(9))))
    monkeypatch.undo()
    again = _service(market, tmp_path, clock)
    assert again._observed[EPOCH] == [obs]
    assert again.report_observations(ObservationBatch(observations=(obs,))) == 0  # still counted once
    assert again.report_observations(ObservationBatch(observations=(observed(8), observed(9)))) == 2
    clock.now = START + EPOCH_S + 200
    record = again.close_epoch(EPOCH)
    assert record is not None and [leaf.node for leaf in record.leaves] == [node.address]
