"""The oracle is down while the broker's spot-check runner reports withheld transcripts, submits
slash evidence, reports a call passed by its fingerprint and reports a job's observations, and
while a worker reports telemetry; then both senders are restarted (new objects on the same
outbox files) and the oracle comes up: every message is delivered and counted exactly once (one
failed verification per node and call, one slash, one fingerprint pass, one observation, each
kept telemetry seq accepted once, no replays).

Real parts: the oracle (``OracleService`` + its FastAPI app under uvicorn on 127.0.0.1, on Anvil
with the market deployed), the broker's ``SpotChecker``, ``OracleSink``, ``JobObserver`` and the
worker's ``WorkerTelemetry`` with their SQLite outboxes. The only stand-in is the network the
runner fetches transcripts over: the next stage is gone (``PeerUnreachableError``), which is what
makes the runner report a withheld transcript."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dlis_market.broker.observations import JobObserver, OracleObservationSink, observe_job
from dlis_market.broker.spot_checks import FinishedSession, OracleSink, SpotChecker
from dlis_market.chain.anvil import free_port
from dlis_market.node.driver import JobSpec
from dlis_market.node.errors import PeerUnreachableError
from dlis_market.node.telemetry import TelemetryRecorder, WorkerTelemetry
from dlis_market.oracle.service import OracleService
from dlis_market.protocol.outbox import Outbox, sqlite_url
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spot_checks import FingerprintCheckPass, SpotCheckSampler
from dlis_market.protocol.telemetry import decode_telemetry
from dlis_market.settings import Settings
from tests.integration.oracle.test_worker_telemetry import ThreadedOracle
from tests.unit.oracle.evidence_helpers import make_evidence, reference_output, signed_receipt

UNIT = 10**18
JOB = b"\x07" * 32  # evidence_helpers' receipts are for this job


class GonePeers:
    """The part of PipelineDriver a transcript fetch uses; every peer is gone."""

    peer_id = "broker-peer"
    settings = SimpleNamespace(request_timeout_s=1.0)

    def __init__(self) -> None:
        self.pool = self
        self.requests = 0

    async def request(self, peer: str, *_: Any) -> Any:
        self.requests += 1
        raise PeerUnreachableError(f"{peer} is gone", peer)


def _settings(market, tmp_path: Path) -> Settings:  # type: ignore[no-untyped-def]
    data = market.settings.model_dump()
    data["home"] = tmp_path / "home"
    data["oracle"]["state_dir"] = tmp_path / "oracle"
    data["outbox"].update({"retry_base_s": 0.1, "retry_max_s": 0.5, "timeout_s": 10.0})
    return Settings.model_validate(data)


def _telemetry(settings: Settings, node, outbox: Outbox, url: str, reputation: str) -> WorkerTelemetry:  # type: ignore[no-untyped-def]
    """As ``Worker._telemetry`` builds it: the outbox file in the worker's identity folder."""
    recorder = TelemetryRecorder(served=None, advertised_tps=5.0, free_kv_slots=lambda: 1)
    return WorkerTelemetry(
        recorder, node_key=bytes(node.key), node_address=node.address, chain_id=settings.node.chain_id,
        reputation_address=reputation, dht=None, interval_s=30.0, oracle_url=url, outbox=outbox,
        keep_unsent=settings.outbox.telemetry_keep, post_timeout_s=settings.outbox.timeout_s,
    )  # fmt: skip


async def _until_empty(*boxes: Outbox, timeout_s: float = 30.0) -> float:
    began = time.monotonic()
    for box in boxes:
        while await box.pending():
            assert time.monotonic() - began < timeout_s, f"{box.url} still holds {len(await box.pending())} rows"
            await asyncio.sleep(0.05)
    return time.monotonic() - began


def test_messages_survive_an_oracle_outage_and_sender_restarts(market, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = _settings(market, tmp_path)
    service = OracleService(settings, market.client, market.oracle, seed=0)
    ops = [market.new_funded_account(300 * UNIT) for _ in range(3)]
    accused, checker_node, worker_node = (market.enroll_node(op, stake=300 * UNIT) for op in ops)
    port = free_port()  # nothing listens here yet: the oracle is down
    url = f"http://127.0.0.1:{port}"
    broker_url = settings.broker_outbox_url
    worker_url = sqlite_url(tmp_path / "worker-identity" / "outbox.db")
    reputation = market.reputation().address
    market_domain = market.market().domain()

    # a finished one-route job of two stages: the runner draws both, the second stage is gone
    route = (RouteHop("peer-a", accused.address, 0, 4, 1), RouteHop("peer-b", checker_node.address, 4, 8, 1))
    data = reference_output().astype("<f4").tobytes()
    receipts = {
        0: StageReceipt(accused.address, signed_receipt(accused, market_domain, data), "peer-a", "s1"),
        4: StageReceipt(checker_node.address, signed_receipt(checker_node, market_domain, data), "peer-b", "s1"),
    }
    finished = FinishedSession(JobSpec("m", [1, 2, 3], 4, job_id=JOB), "s1", route, receipts, (5, 6, 7, 8))
    out = reference_output()
    evidence = make_evidence(accused, checker_node, market_domain, out + 1.0, out, job=b"\x0b" * 32,
                             runner=market.oracle, oracle_domain=service.domain)  # fmt: skip

    def broker(box: Outbox) -> tuple[SpotChecker, JobObserver, OracleSink]:
        sink = OracleSink(url, box, timeout_s=settings.outbox.timeout_s)
        checker = SpotChecker(GonePeers(), SpotCheckSampler(1.0, b"k"), bytes(market.oracle.key),  # type: ignore[arg-type]
                              service.domain, sink, lambda _m: ("fp32", 64))  # fmt: skip
        observer = JobObserver(market.oracle.key, service.domain, OracleObservationSink(url, box))
        return checker, observer, sink

    async def while_down() -> dict[str, Any]:
        box = Outbox.from_settings(broker_url, settings.outbox)
        checker, observer, sink = broker(box)
        assert checker.schedule(finished) == [0, 4]
        await checker.drain()
        slash = await sink.submit(evidence)
        passed = FingerprintCheckPass(node=worker_node.address, checker=checker_node.address, job_id="0x" + JOB.hex(),
                                      start=8, end=12, fingerprint_hash="0x" + "ab" * 32)  # fmt: skip
        fingerprint = await sink.report_fingerprint_pass(passed.signed_by_runner(market.oracle.key, service.domain))
        await observer.report(observe_job(JOB, route, 4, 0.5))
        worker_box = Outbox.from_settings(worker_url, settings.outbox)
        tel = _telemetry(settings, worker_node, worker_box, url, reputation)
        blobs = [await tel.report_once(None) for _ in range(3)]
        queued = {"broker": len(await box.pending()), "worker": len(await worker_box.pending())}
        await checker.close()  # the broker process stops: its outbox file keeps the rows
        await worker_box.close()  # ...and so does the worker's
        return {"results": list(checker.results), "slash": slash, "fingerprint": fingerprint,
                "observed": dict(observer.counts),
                "queued": queued, "blobs": blobs, "sent": tel.sent}  # fmt: skip

    down = asyncio.run(while_down())
    assert [r.outcome for r in down["results"]] == ["withheld", "withheld"]
    assert all("queued" in r.detail for r in down["results"]), down["results"]
    assert down["slash"]["outcome"] == "queued" and down["observed"] == {"queued": 2}
    assert down["fingerprint"]["outcome"] == "queued"
    # two failure reports for the same node and call are one row; evidence; the fingerprint pass; one
    # observation batch; telemetry keeps only its newest two unsent reports (older ones would be stale)
    assert down["queued"] == {"broker": 4, "worker": 2} and down["sent"] == 0
    assert service._checks == {} and service.slashes == 0 and service.intake.counts["accepted"] == 0

    async def after_restart() -> tuple[float, int]:
        box = Outbox.from_settings(broker_url, settings.outbox)  # new processes, same files
        checker, _observer, sink = broker(box)
        sink.start()  # what the broker does at start: rows of the earlier run go out
        worker_box = Outbox.from_settings(worker_url, settings.outbox)
        tel = _telemetry(settings, worker_node, worker_box, url, reputation)
        stop = asyncio.Event()
        running = asyncio.create_task(tel.run(stop))  # the worker's loop starts its outbox first
        with ThreadedOracle(service, port):  # the oracle comes up
            took = await _until_empty(box, worker_box)
            stop.set()
            await running
            await checker.close()
        return took, tel.sent

    stake_before = market.staking().info(ops[0].address).active
    took, sent = asyncio.run(after_restart())
    epoch = service.epoch_of(time.time())
    assert dict(service._checks[epoch]) == {
        checker_node.address: [1, 1], accused.address: [0, 1], worker_node.address: [1, 0]
    }  # fmt: skip
    assert service.slashes == 1
    assert market.staking().info(ops[0].address).active == stake_before - service.config.slash_amount
    observed = [o for batch in service._observed.values() for o in batch]
    assert sorted((o.node, o.start) for o in observed) == sorted((h.node, h.start) for h in route)
    dropped, *kept = (decode_telemetry(b, 1 << 16, 1 << 18).report.seq for b in down["blobs"])
    seqs = [r.telemetry.report.seq for r in service._pending if r.telemetry.report.node == worker_node.address]
    assert seqs[:2] == kept and dropped not in seqs  # the kept reports arrive first, in order, once
    assert len(seqs) == len(set(seqs)) and sent == len(seqs)  # (+1 when the restarted loop reported already)
    assert service.intake.counts["duplicate"] == service.intake.counts["superseded"] == 0
    assert service.intake.counts["stale"] == 0
    print(f"\noutbox drained {took:.2f} s after the oracle came up (retry_base_s 0.1, retry_max_s 0.5)")
