"""The oracle service end to end on Anvil: HTTP telemetry intake -> epoch posted with its Merkle
root -> proofs (HTTP and `dlis oracle proof`) verify on chain; spot checks slash or credit."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp
import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dlis_market.chain.anvil import free_port
from dlis_market.chain.errors import ChainUnavailableError
from dlis_market.cli.oracle import app as oracle_cli
from dlis_market.oracle.errors import OracleRoleMissingError
from dlis_market.oracle.server import create_app
from dlis_market.oracle.service import OracleService
from dlis_market.protocol.errors import TelemetryRefusedError
from dlis_market.protocol.oracle_client import TelemetrySender
from dlis_market.protocol.spot_checks import FingerprintCheckPass, SpotCheckFailure
from dlis_market.protocol.telemetry import (
    SignedTelemetry,
    TelemetryMetrics,
    TelemetryReport,
    encode_telemetry,
    oracle_domain,
    sign_telemetry,
)
from dlis_market.settings import Settings

# one copy of the evidence builder, shared with the unit tests (pytest runs as `python -m pytest` from the root)
from tests.unit.oracle.evidence_helpers import JOB, make_evidence, reference_output

UNIT = 10**18
EPOCH_S = 600
EPOCH = 3_000_000  # epoch k covers [k * 600, (k + 1) * 600) of unix time
START = EPOCH * EPOCH_S


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _settings(market, tmp_path) -> Settings:  # type: ignore[no-untyped-def]
    data = market.settings.model_dump()
    data["oracle"].update({"state_dir": tmp_path / "oracle", "epoch_s": EPOCH_S, "heartbeat_interval_s": 60.0})
    return Settings.model_validate(data)


def _report(service: OracleService, key, seq: int, ts: int, **kw) -> SignedTelemetry:  # type: ignore[no-untyped-def]
    metrics = TelemetryMetrics.model_validate(
        {
            "uptime_s": float(max(0, ts - START)),
            "advertised_tps": 50.0,
            "measured_tps": 40.0,
            "free_kv_slots": 2,
            "latencies_ms": (20.0, 30.0),
            "sessions_ok": 1,
            **kw,
        }
    )
    report = TelemetryReport(node=key.address, seq=seq, timestamp=ts, metrics=metrics)
    return sign_telemetry(key.key, service.domain, report)


@pytest.fixture()
def setup(market, tmp_path):  # type: ignore[no-untyped-def]
    ops = [market.new_funded_account(300 * UNIT) for _ in range(2)]
    steady, flaky = (market.enroll_node(op, stake=300 * UNIT) for op in ops)
    clock = Clock(START)
    service = OracleService(_settings(market, tmp_path), market.client, market.oracle, clock=clock, seed=0)
    return service, TestClient(create_app(service)), clock, steady, flaky, ops


def _post(http: TestClient, signed: SignedTelemetry):  # type: ignore[no-untyped-def]
    return http.post("/v1/telemetry", content=encode_telemetry(signed), headers={"content-type": "application/zstd"})


def test_epoch_posted_and_proofs_verify_on_chain(market, setup, tmp_path) -> None:
    service, http, clock, steady, flaky, _ = setup
    for i in range(10):
        clock.now = START + 60 * i + 5
        assert _post(http, _report(service, steady, i + 1, int(clock.now))).status_code == 202
        if i % 2 == 0:
            r = _post(http, _report(service, flaky, i + 1, int(clock.now), measured_tps=20.0, sessions_failed=1))
            assert r.status_code == 202, r.text
    # refusals over HTTP: replay, forgery (steady's report signed by flaky), stale, garbage
    replay = _post(http, _report(service, steady, 10, int(clock.now)))
    assert replay.status_code == 409 and replay.json()["reason"] == "duplicate"
    good = _report(service, steady, 11, int(clock.now))
    forged = SignedTelemetry(report=good.report, signature=_report(service, flaky, 11, int(clock.now)).signature)
    assert _post(http, forged).status_code == 401
    assert _post(http, _report(service, steady, 12, int(clock.now) - 3600)).json()["reason"] == "stale"
    assert http.post("/v1/telemetry", content=b"junk").status_code == 400
    stranger = market.new_funded_account(0)  # signs correctly but is not registered
    assert _post(http, _report(service, stranger, 1, int(clock.now))).status_code == 403
    metrics = http.get("/metrics").text
    assert 'dlis_oracle_telemetry_reports_total{outcome="accepted"} 15.0' in metrics
    assert 'dlis_oracle_telemetry_reports_total{outcome="forged"} 1.0' in metrics

    clock.now = START + EPOCH_S + 40
    record = service.close_epoch(EPOCH)
    assert record is not None
    rep = market.reputation()
    assert rep.telemetry_root(EPOCH) == bytes.fromhex(record.root[2:])
    scores = {leaf.node: leaf.score_bps for leaf in record.leaves}
    assert scores[steady.address] > scores[flaky.address] > 0
    for node in (steady.address, flaky.address):
        proof = http.get(f"/v1/proof/{node}/{EPOCH}").json()
        leaf = bytes.fromhex(proof["leaf_hash"][2:])
        assert rep.verify(EPOCH, leaf, [bytes.fromhex(p[2:]) for p in proof["proof"]])
        assert rep.at(node, EPOCH) == scores[node]
    assert http.get(f"/v1/proof/{stranger.address}/{EPOCH}").status_code == 404

    agg = http.get("/v1/aggregates").json()
    assert agg["epoch"] == EPOCH and agg["nodes"] == 2 and agg["excluded_nodes"] == 0
    assert "uptime_fraction" not in json.dumps(agg)  # no raw per-node telemetry published
    node_info = http.get(f"/v1/nodes/{steady.address}").json()
    assert node_info["reputation_bps"] == scores[steady.address]
    assert node_info["privacy"]["spent"] == pytest.approx(service.config.dp_epsilon)

    risks = http.get("/v1/risk").json()
    assert 0 < risks[steady.address] < risks[flaky.address] <= 1
    view = http.get("/v1/nodes").json()
    assert view[flaky.address] == {
        "reputation_bps": scores[flaky.address],
        "reputation_epoch": EPOCH,
        "failure_risk": risks[flaky.address],
    }
    clock.now = START + EPOCH_S + 300  # both silent for 4 slots: gone
    assert service.failure_risk(steady.address) == 1.0

    # `dlis oracle proof NODE EPOCH --json` checks the stored proof against the chain
    env = {"DLIS_HOME": str(market.settings.home), "DLIS_CHAIN__RPC_URL": market.anvil.rpc_url}
    out = CliRunner().invoke(
        oracle_cli, ["proof", flaky.address, str(EPOCH), "--state-dir", str(tmp_path / "oracle"), "--json"], env=env
    )
    assert out.exit_code == 0, out.output
    shown = json.loads(out.stdout)
    assert shown["verifies_on_chain"] and shown["verifies_offline"]
    assert shown["chain_score_bps"] == scores[flaky.address]
    human = CliRunner().invoke(
        oracle_cli, ["proof", flaky.address, str(EPOCH), "--state-dir", str(tmp_path / "oracle")], env=env
    )
    assert human.exit_code == 0 and "verifies" in human.stdout
    missing = CliRunner().invoke(
        oracle_cli, ["proof", flaky.address, str(EPOCH + 1), "--state-dir", str(tmp_path / "oracle")], env=env
    )
    assert missing.exit_code == 1


def test_restarted_oracle_still_refuses_replays(market, setup, tmp_path) -> None:
    service, http, clock, steady, _, _ = setup
    signed = _report(service, steady, 7, int(clock.now))
    assert _post(http, signed).status_code == 202
    again = OracleService(service.settings, market.client, market.oracle, clock=clock, seed=0)
    assert [r.telemetry.report.seq for r in again._pending] == [7]  # the unposted epoch's reports came back
    with pytest.raises(TelemetryRefusedError) as err:
        again.submit_telemetry(encode_telemetry(signed))
    assert err.value.reason == "duplicate"  # known from the store after the restart


def _check(http: TestClient, evidence):  # type: ignore[no-untyped-def]
    return http.post(
        "/v1/spot-checks", content=evidence.model_dump_json(), headers={"content-type": "application/json"}
    )


def test_spot_checks_over_http_slash_or_credit(market, setup) -> None:
    service, http, clock, steady, flaky, ops = setup
    domain = market.market().domain()
    out = reference_output()
    passed = _check(
        http, make_evidence(flaky, steady, domain, out + 1e-6, out, runner=market.oracle, oracle_domain=service.domain)
    )
    assert passed.status_code == 200, passed.text
    assert passed.json()["outcome"] == "pass"
    bad = make_evidence(
        flaky, steady, market.registry().domain(), out + 1.0, out, runner=market.oracle, oracle_domain=service.domain
    )
    refused = _check(http, bad)
    assert refused.status_code == 422 and refused.json()["reason"] == "bad_signature"
    assert market.staking().info(ops[1].address).active == 300 * UNIT
    ev = make_evidence(
        flaky, steady, domain, out + 1.0, out, job=b"\x09" * 32, runner=market.oracle, oracle_domain=service.domain
    )
    slashed = _check(http, ev)
    assert slashed.status_code == 200, slashed.text
    assert slashed.json()["outcome"] == "slashed"
    assert market.staking().info(ops[1].address).active == 300 * UNIT - service.config.slash_amount
    # the checks count in the epoch's reputation: the slashed node's verification component drops
    record = service.close_epoch(service.epoch_of(clock.now))
    assert record is not None
    scores = {leaf.node: leaf.score_bps for leaf in record.leaves}
    assert scores[flaky.address] < scores[steady.address]
    assert "dlis_oracle_slashes_total 1.0" in http.get("/metrics").text


def test_fingerprint_pass_credits_the_node_once_and_only_from_a_trusted_runner(market, setup) -> None:
    """A replica accepted flaky's call from its signed fingerprint: the runner's signed statement
    is one passed verification for flaky (its checker gets nothing for accepting); a statement
    not signed by a trusted runner, or changed after signing, counts nothing."""
    service, http, clock, steady, flaky, ops = setup
    passed = FingerprintCheckPass(node=flaky.address, checker=steady.address, job_id="0x" + JOB.hex(), start=0,
                                  end=10, fingerprint_hash="0x" + "ab" * 32, detail="margin 0.61")  # fmt: skip

    def post(p: FingerprintCheckPass):  # type: ignore[no-untyped-def]
        return http.post("/v1/spot-checks/fingerprint-passes", content=p.model_dump_json(),
                         headers={"content-type": "application/json"})  # fmt: skip

    epoch = service.epoch_of(clock.now)
    signed = passed.signed_by_runner(market.oracle.key, service.domain)
    forged = [
        passed,  # unsigned
        passed.signed_by_runner(flaky.key, service.domain),  # by the node itself
        signed.model_copy(update={"node": steady.address}),  # moved to another node
        signed.model_copy(update={"fingerprint_hash": "0x" + "cd" * 32}),  # another commitment
        signed.model_copy(update={"checker": flaky.address}),
    ]
    for bad in forged:
        refused = post(bad)
        assert refused.status_code == 422 and refused.json()["reason"] == "unauthorized_runner", refused.text
    assert dict(service._checks[epoch]) == {}
    assert post(signed).json() == {"recorded": True, "node": flaky.address}
    assert post(signed).json()["recorded"] is False  # the same call is counted once
    assert dict(service._checks[epoch]) == {flaky.address: [1, 0]}  # [passed, failed]: the checker has none
    # the call re-executed as well is not credited a second time (one key per call, however checked)
    out = reference_output()
    ev = make_evidence(flaky, steady, market.market().domain(), out, out, runner=market.oracle,
                       oracle_domain=service.domain)  # fmt: skip
    assert _check(http, ev).json()["outcome"] == "pass"
    assert dict(service._checks[epoch]) == {flaky.address: [1, 0]}
    # a restarted oracle remembers it
    again = OracleService(service.settings, market.client, market.oracle, clock=clock, seed=0)
    assert again.report_fingerprint_pass(signed) is False
    assert dict(again._checks[epoch]) == {flaky.address: [1, 0]}


def test_withheld_transcript_is_a_failed_verification_only_from_a_trusted_runner(market, setup) -> None:
    service, http, clock, steady, flaky, ops = setup
    failure = SpotCheckFailure(node=flaky.address, job_id="0x" + "07" * 32, start=0, end=10, detail="no transcript")

    def post(f: SpotCheckFailure):  # type: ignore[no-untyped-def]
        return http.post("/v1/spot-checks/failures", content=f.model_dump_json(),
                         headers={"content-type": "application/json"})  # fmt: skip

    for untrusted in (failure, failure.signed_by_runner(flaky.key, service.domain)):  # unsigned; a node itself
        refused = post(untrusted)
        assert refused.status_code == 422 and refused.json()["reason"] == "unauthorized_runner"
    tampered = failure.signed_by_runner(market.oracle.key, service.domain).model_copy(update={"node": steady.address})
    assert post(tampered).json().get("reason") == "unauthorized_runner"  # the signature covers the node
    signed = failure.signed_by_runner(market.oracle.key, service.domain)
    assert post(signed).json() == {"recorded": True, "node": flaky.address}
    assert post(signed).json()["recorded"] is False  # the same call is counted once
    # a passed check for both, then the failure: flaky's verification component drops below steady's
    out = reference_output()
    ev = make_evidence(flaky, steady, market.market().domain(), out, out, runner=market.oracle,
                       oracle_domain=service.domain)  # fmt: skip
    assert _check(http, ev).json()["outcome"] == "pass"
    assert _check(http, ev).json()["outcome"] == "pass"  # posted twice, credited once
    checks = service._checks[service.epoch_of(clock.now)]
    assert checks[steady.address] == [1, 0] and checks[flaky.address] == [1, 1]  # [passed, failed]
    # a restarted oracle keeps the epoch's results and remembers what it counted
    again = OracleService(service.settings, market.client, market.oracle, clock=clock, seed=0)
    assert dict(again._checks[service.epoch_of(clock.now)]) == dict(checks)
    assert again.report_failure(signed) is False
    assert again.report_spot_check(ev).outcome == "pass"
    assert dict(again._checks[service.epoch_of(clock.now)]) == dict(checks)
    record = service.close_epoch(service.epoch_of(clock.now))
    assert record is not None
    scores = {leaf.node: leaf.score_bps for leaf in record.leaves}
    assert scores[flaky.address] < scores[steady.address]
    assert market.staking().info(ops[0].address).active == 300 * UNIT  # nothing slashed
    assert market.staking().info(ops[1].address).active == 300 * UNIT


def test_run_loop_closes_due_epochs(market, setup) -> None:
    service, http, clock, steady, _, _ = setup
    assert _post(http, _report(service, steady, 1, int(clock.now) + 5)).status_code == 202
    clock.now = START + EPOCH_S + service.config.telemetry_max_age_s + 1  # epoch EPOCH is due

    async def run_once() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        for _ in range(200):
            if service.posted_epochs:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(run_once())
    assert service.posted_epochs == 1
    assert market.reputation().latest_epoch() == EPOCH


def test_cli_start_serves_telemetry(market, tmp_path) -> None:
    op = market.new_funded_account(300 * UNIT)
    node = market.enroll_node(op, stake=300 * UNIT)
    port = free_port()
    env = {
        **os.environ,
        "DLIS_HOME": str(market.settings.home),
        "DLIS_CHAIN__RPC_URL": market.anvil.rpc_url,
        "DLIS_ORACLE__STATE_DIR": str(tmp_path / "oracle"),
    }
    code = "from dlis_market.cli.oracle import app; app()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "start", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(150):
            try:
                if httpx.get(base + "/metrics", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            proc.kill()
            pytest.fail(f"oracle did not start: {proc.stdout.read().decode() if proc.stdout else ''}")
        domain = oracle_domain(market.client.chain_id, market.reputation().address)
        sender = TelemetrySender(node.key, node.address, domain)
        metrics = TelemetryMetrics(uptime_s=1.0, advertised_tps=10.0, measured_tps=10.0, free_kv_slots=1)

        async def send_twice() -> tuple[dict[str, object], str]:
            async with aiohttp.ClientSession() as session:
                first = await sender.send(session, base, metrics)
                sender._last_seq -= 1_000_000_000  # a worker that forgot its seq (clock went back)
                sender.clock = lambda: time.time() - 3600
                with pytest.raises(TelemetryRefusedError) as err:
                    await sender.send(session, base, metrics)
                return first, err.value.reason

        accepted, refused = asyncio.run(send_twice())
        assert accepted["accepted"] is True and refused == "superseded"
        assert node.address in httpx.get(base + "/v1/risk", timeout=10).json()
    finally:
        proc.terminate()
        proc.wait(10)


def test_chain_failure_is_a_503_problem(market, setup, monkeypatch) -> None:
    service, http, *_ = setup

    def down(node: str) -> None:
        raise ChainUnavailableError("no JSON-RPC answer at http://127.0.0.1:1")

    monkeypatch.setattr(service.registry, "get", down)
    stranger = market.new_funded_account(0)
    r = _post(http, _report(service, stranger, 1, START))
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
    assert "no JSON-RPC answer" in r.json()["detail"]


def test_start_refuses_an_account_without_roles(market, tmp_path) -> None:
    stranger = market.new_funded_account(0)
    service = OracleService(_settings(market, tmp_path), market.client, stranger)
    with pytest.raises(OracleRoleMissingError, match="lacks ORACLE_ROLE on ReputationOracle and SLASHER_ROLE"):
        service.check_roles()
    OracleService(_settings(market, tmp_path), market.client, market.oracle).check_roles()
