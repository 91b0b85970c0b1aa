"""Attacker: a node operator who inflates its reputation with what it says about itself rather than
with what it does: reports backdated to fill the heartbeat slots it was offline for, and telemetry
claiming more throughput, lower latency and more finished sessions than it delivered.

Real Anvil with the real contracts, the real oracle service and its HTTP app; the oracle's clock is
a fake the test advances (reports "arrive" when the test posts them). The epoch is scored and posted
on chain by the oracle; the tests read the posted leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient

from dlis_market.chain.devnet import LocalMarket
from dlis_market.oracle.server import create_app
from dlis_market.oracle.service import OracleService
from dlis_market.protocol.observations import ObservationBatch, StageObservation
from dlis_market.protocol.telemetry import TelemetryMetrics, TelemetryReport, encode_telemetry, sign_telemetry
from dlis_market.settings import Settings

UNIT = 10**18
STAKE = 300 * UNIT
EPOCH_S = 600
HEARTBEAT_S = 60
EPOCH = 3_000_000
START = EPOCH * EPOCH_S


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Oracle:
    service: OracleService
    http: TestClient
    clock: Clock
    market: LocalMarket
    seqs: dict[str, int]

    def node(self) -> LocalAccount:
        """A node of its own operator, all with the same stake (the stake component is equal)."""
        return self.market.enroll_node(self.market.new_funded_account(STAKE), stake=STAKE)

    def report(self, node: LocalAccount, timestamp: float, **metrics: object) -> httpx.Response:
        """``node`` signs a report claiming ``timestamp`` and posts it now (``clock.now``)."""
        self.seqs[node.address] = self.seqs.get(node.address, 0) + 1
        body = {"uptime_s": 3600.0, "advertised_tps": 50.0, "measured_tps": 20.0, "free_kv_slots": 2, **metrics}
        report = TelemetryReport(
            node=node.address, seq=self.seqs[node.address], timestamp=int(timestamp),
            metrics=TelemetryMetrics.model_validate(body),
        )  # fmt: skip
        blob = encode_telemetry(sign_telemetry(node.key, self.service.domain, report))
        return self.http.post("/v1/telemetry", content=blob, headers={"content-type": "application/zstd"})

    def close(self) -> dict[str, int]:
        """Close the epoch once its reports can no longer arrive; the scores posted on chain."""
        self.clock.now = START + EPOCH_S + self.service.config.telemetry_max_age_s + 1
        record = self.service.close_epoch(EPOCH)
        assert record is not None
        reputation = self.market.reputation()
        scores = {leaf.node: leaf.score_bps for leaf in record.leaves}
        for node, score in scores.items():
            assert reputation.at(node, EPOCH) == score  # what the chain holds
        return scores


@pytest.fixture()
def oracle(market: LocalMarket, tmp_path: Path) -> Oracle:
    data = market.settings.model_dump()
    data["oracle"].update({"state_dir": tmp_path / "oracle", "epoch_s": EPOCH_S, "heartbeat_interval_s": HEARTBEAT_S})
    clock = Clock(START)
    service = OracleService(Settings.model_validate(data), market.client, market.oracle, clock=clock, seed=0)
    return Oracle(service, TestClient(create_app(service)), clock, market, {})


def test_backdated_reports_do_not_backfill_uptime(oracle: Oracle) -> None:
    """Online once per 5 minutes; each time the backfiller also signs the reports of the 4 minutes
    it missed. It must score exactly as an honest node online at the same moments."""
    always, sparse, backfiller = oracle.node(), oracle.node(), oracle.node()
    backdated = []
    for minute in range(10):
        oracle.clock.now = START + minute * HEARTBEAT_S + 30
        assert oracle.report(always, oracle.clock.now).status_code == 202
        if minute % 5 == 4:  # minutes 4 and 9: the other two come online
            assert oracle.report(sparse, oracle.clock.now).status_code == 202
            for back in (4, 3, 2, 1, 0):  # the missed minutes first, seq increasing, then now
                backdated.append(oracle.report(backfiller, oracle.clock.now - back * HEARTBEAT_S))
    scores = oracle.close()
    print({"always": scores[always.address], "sparse": scores[sparse.address],
           "backfiller": scores[backfiller.address]})  # fmt: skip
    assert scores[backfiller.address] == scores[sparse.address]
    assert scores[always.address] > scores[sparse.address]
    # what the oracle refused: reports claiming a time further back than its window
    window_s = oracle.service.config.telemetry_max_age_s
    assert window_s <= 2 * HEARTBEAT_S
    for back, res in zip([4, 3, 2, 1, 0] * 2, backdated, strict=True):
        if back * HEARTBEAT_S > window_s:
            assert res.status_code == 422 and res.json()["reason"] == "stale", res.text
        else:
            assert res.status_code == 202, res.text


def test_self_reported_performance_gains_nothing(oracle: Oracle) -> None:
    """Two nodes online all epoch, equally (un)observed by the broker; one claims full throughput,
    1 ms steps and 50 finished sessions a minute, the other reports its real, modest figures."""
    boaster, modest = oracle.node(), oracle.node()
    for minute in range(10):
        oracle.clock.now = START + minute * HEARTBEAT_S + 30
        inflated = {"measured_tps": 50.0, "latencies_ms": (1.0,) * 8, "sessions_ok": 50}
        assert oracle.report(boaster, oracle.clock.now, **inflated).status_code == 202
        real = {"measured_tps": 12.0, "latencies_ms": (90.0,) * 8, "sessions_ok": 1, "sessions_failed": 1}
        assert oracle.report(modest, oracle.clock.now, **real).status_code == 202
    scores = oracle.close()
    print({"boaster": scores[boaster.address], "modest": scores[modest.address]})
    assert scores[boaster.address] == scores[modest.address]


def _observed(oracle: Oracle, node: LocalAccount, job: int, ms_per_token: int, ok: bool = True) -> StageObservation:
    """The broker's signed observation of ``node`` serving layers [0, 10) of job ``job``."""
    return StageObservation(
        node=node.address, job_id="0x" + f"{job:064x}", start=0, end=10, tokens=32 if ok else 0,
        latency_ms=32 * ms_per_token if ok else 0, routed_tps=10.0, ok=ok,
    ).signed_by_runner(oracle.market.oracle.key, oracle.service.domain)  # fmt: skip


def _observe(oracle: Oracle, *observations: StageObservation) -> httpx.Response:
    body = ObservationBatch(observations=observations).model_dump_json()
    return oracle.http.post("/v1/observations", content=body, headers={"content-type": "application/json"})


def test_what_the_broker_observed_decides_not_what_the_node_claims(oracle: Oracle) -> None:
    """The boaster claims full speed; the broker timed it at 100 ms per token, like the modest
    node, and saw a third node (perfect claims too) at 400 ms per token and failing a job."""
    boaster, modest, slow = oracle.node(), oracle.node(), oracle.node()
    for minute in range(10):
        oracle.clock.now = START + minute * HEARTBEAT_S + 30
        inflated = {"measured_tps": 50.0, "latencies_ms": (1.0,) * 8, "sessions_ok": 50}
        assert oracle.report(boaster, oracle.clock.now, **inflated).status_code == 202
        assert oracle.report(slow, oracle.clock.now, **inflated).status_code == 202
        assert oracle.report(modest, oracle.clock.now, measured_tps=10.0, latencies_ms=(100.0,)).status_code == 202
    jobs = [_observed(oracle, n, job, 100) for job in range(3) for n in (boaster, modest)]
    jobs += [_observed(oracle, slow, 10 + job, 400) for job in range(2)] + [_observed(oracle, slow, 12, 0, ok=False)]
    assert _observe(oracle, *jobs).json() == {"recorded": 9, "of": 9}
    assert _observe(oracle, *jobs).json() == {"recorded": 0, "of": 9}  # posted again: counted once

    # a node cannot vouch for itself, and nobody can edit what the broker signed
    self_signed = jobs[0].signed_by_runner(boaster.key, oracle.service.domain)
    refused = _observe(oracle, self_signed)
    assert refused.status_code == 422 and refused.json()["reason"] == "unauthorized_runner", refused.text
    faster = jobs[0].model_copy(update={"job_id": "0x" + "ab" * 32, "latency_ms": 32})
    refused = _observe(oracle, _observed(oracle, boaster, 99, 100), faster)
    assert refused.status_code == 422 and refused.json()["reason"] == "tampered", refused.text

    scores = oracle.close()
    print({"boaster": scores[boaster.address], "modest": scores[modest.address], "slow": scores[slow.address]})
    assert scores[boaster.address] == scores[modest.address]  # 99 (refused batch) never counted
    assert scores[slow.address] < scores[modest.address]
