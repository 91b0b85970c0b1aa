"""Worker telemetry: the recorder's intervals and caps, signed reports the oracle intake accepts,
DHT store + POST of the same blob, failures that do not stop the worker, the oracle's DHT relay
(copies skipped, refusals counted once) and the worker CLI's telemetry / --byzantine flags."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
from aiohttp import ClientSession, web
from eth_account import Account
from typer.testing import CliRunner

from dlis_market.chain.anvil import free_port
from dlis_market.cli import worker as worker_cli
from dlis_market.node.telemetry import TelemetryRecorder, WorkerTelemetry
from dlis_market.oracle.dht_relay import DhtTelemetryRelay
from dlis_market.oracle.telemetry import TelemetryIntake
from dlis_market.protocol.errors import TelemetryRefusedError
from dlis_market.protocol.telemetry import (
    MAX_JOBS,
    MAX_LATENCIES,
    TELEMETRY_KEY,
    decode_telemetry,
    fetch_telemetry,
    oracle_domain,
    parse_telemetry,
)
from dlis_market.types import ZERO_ADDRESS, LayerRange

REPUTATION = "0x" + "ab" * 20
NODE = Account.from_key(b"\x22" * 32)
STRANGER = Account.from_key(b"\x33" * 32)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeDht:
    """hivemind.DHT's store/get for one dictionary key with subkeys (expirations are kept, not enforced)."""

    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}
        self.stores = 0

    def store(self, key: str, value: Any, expiration: float, subkey: str) -> bool:
        assert key == TELEMETRY_KEY
        self.stores += 1
        self.entries[subkey] = SimpleNamespace(value=value, expiration_time=expiration)
        return True

    def get(self, key: str, latest: bool = False) -> Any:
        return SimpleNamespace(value=dict(self.entries), expiration_time=0.0) if self.entries else None

    def shutdown(self) -> None:
        pass


def _recorder(clock: Clock | None = None, free: int = 3) -> TelemetryRecorder:
    return TelemetryRecorder(
        served=LayerRange(start=2, end=4),
        advertised_tps=50.0,
        free_kv_slots=lambda: free,
        gflops=12.5,
        memory_mib=2048,
        clock=clock or Clock(),
    )


def _intake(registered: set[str] | None = None) -> TelemetryIntake:
    return TelemetryIntake(
        oracle_domain(31337, REPUTATION),
        max_age_s=300.0,
        max_skew_s=30.0,
        max_bytes=64 << 10,
        max_decompressed_bytes=256 << 10,
        is_registered=(lambda node: node in registered) if registered is not None else None,
    )


def _telemetry(
    recorder: TelemetryRecorder | None = None, dht: Any = None, oracle_url: str | None = None, key: Any = NODE
) -> WorkerTelemetry:
    return WorkerTelemetry(
        recorder or _recorder(),
        node_key=bytes(key.key),
        node_address=key.address,
        chain_id=31337,
        reputation_address=REPUTATION,
        dht=dht,
        interval_s=0.2,
        oracle_url=oracle_url,
    )


# ---------------------------------------------------------------------- recorder


def test_report_covers_one_interval_then_resets() -> None:
    clock = Clock()
    rec = _recorder(clock)
    rec.on_step("prefill", 8, 0.1)
    rec.on_step("decode", 1, 0.02)
    rec.on_step("decode", 2, 0.03)  # two sessions batched: one latency, two tokens
    rec.on_session_closed(b"\x01" * 32, True, 11, 25.0)
    clock.now += 30.0
    first = rec.report()
    assert first.uptime_s == 30.0
    assert first.served == LayerRange(start=2, end=4)
    assert (first.advertised_tps, first.free_kv_slots, first.gflops, first.memory_mib) == (50.0, 3, 12.5, 2048)
    assert first.latencies_ms == pytest.approx((20.0, 30.0))
    assert first.measured_tps == pytest.approx(11 / 0.15)  # tokens per second of forward-pass time
    assert [(j.job_id, j.ok, j.tokens, j.latency_ms) for j in first.jobs] == [("0x" + "01" * 32, True, 11, 25.0)]
    assert (first.sessions_ok, first.sessions_failed) == (0, 0)  # the job entry is the session's only count

    clock.now += 30.0
    second = rec.report()  # an idle interval
    assert second.uptime_s == 60.0
    assert second.latencies_ms == () and second.jobs == ()
    assert second.measured_tps == pytest.approx(first.measured_tps)  # idle: the last measured figure

    rec.on_step("decode", 4, 0.1)
    assert rec.report().measured_tps == pytest.approx(40.0)


def test_idle_worker_reports_zero_measured_tps() -> None:
    metrics = _recorder(free=0).report()
    assert (metrics.measured_tps, metrics.free_kv_slots, metrics.latencies_ms) == (0.0, 0, ())


def test_caps_on_latencies_and_jobs_lose_no_session() -> None:
    rec = _recorder()
    for _ in range(MAX_LATENCIES + 40):
        rec.on_step("decode", 1, 0.01)
    for i in range(MAX_JOBS + 7):
        rec.on_session_closed(i.to_bytes(32, "big"), ok=i % 10 != 0, tokens=5, latency_ms=10.0)
    m = rec.report()
    assert len(m.latencies_ms) == MAX_LATENCIES
    assert len(m.jobs) == MAX_JOBS
    # sessions beyond MAX_JOBS are counted, not dropped: 71 sessions, 8 failed (i = 0, 10, ..., 70)
    jobs_ok = sum(j.ok for j in m.jobs)
    assert jobs_ok + m.sessions_ok == 63 and (MAX_JOBS - jobs_ok) + m.sessions_failed == 8
    assert m.measured_tps == pytest.approx(100.0)  # every step counted in the rate, capped list or not


def test_session_latency_defaults_to_mean_decode_step() -> None:
    rec = _recorder()
    rec.on_step("decode", 1, 0.010)
    rec.on_step("decode", 1, 0.030)
    rec.on_session_closed(b"\x07" * 32, True, 2)
    assert rec.report().jobs[0].latency_ms == pytest.approx(20.0)


# ---------------------------------------------------------------------- signed reports


def test_report_is_signed_by_the_node_key_and_checked_by_the_intake() -> None:
    dht = FakeDht()
    tel = _telemetry(dht=dht)
    blob = asyncio.run(tel.report_once(None))
    assert fetch_telemetry(dht) == {NODE.address: blob}  # on the DHT under the node address

    intake = _intake({NODE.address})  # a fake NodeRegistry lookup
    signed = intake.submit(blob)
    assert signed.report.node == NODE.address and signed.report.metrics.served == LayerRange(start=2, end=4)
    with pytest.raises(TelemetryRefusedError) as err:
        intake.submit(blob)
    assert err.value.reason == "duplicate"
    assert intake.submit(asyncio.run(tel.report_once(None))).report.seq > signed.report.seq

    with pytest.raises(TelemetryRefusedError) as err:
        _intake(set()).submit(blob)  # registry does not know the node
    assert err.value.reason == "unregistered"
    other_domain = TelemetryIntake(
        oracle_domain(1, REPUTATION), max_age_s=300, max_skew_s=30, max_bytes=1 << 16, max_decompressed_bytes=1 << 18
    )
    with pytest.raises(TelemetryRefusedError) as err:
        other_domain.submit(blob)  # signed for chain 31337, not chain 1
    assert err.value.reason == "forged"


def test_zero_reputation_address_turns_telemetry_off(caplog: pytest.LogCaptureFixture) -> None:
    tel = WorkerTelemetry(
        _recorder(),
        node_key=bytes(NODE.key),
        node_address=NODE.address,
        chain_id=31337,
        reputation_address=ZERO_ADDRESS,
        dht=FakeDht(),
        interval_s=0.01,
        oracle_url="http://127.0.0.1:1",
    )
    with caplog.at_level(logging.INFO, logger="dlis_market.node.telemetry"):
        asyncio.run(asyncio.wait_for(tel.run(asyncio.Event()), 5))  # returns at once
    assert not tel.enabled and tel.dht.stores == 0  # type: ignore[union-attr]
    assert [r.levelno for r in caplog.records if "telemetry is off" in r.message] == [logging.INFO]


class FakeOracle:
    """POST /v1/telemetry on 127.0.0.1: 202 for the first ``accept`` reports, then 403 unregistered."""

    def __init__(self, accept: int) -> None:
        self.accept = accept
        self.bodies: list[bytes] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        if len(self.bodies) <= self.accept:
            return web.json_response({"accepted": True}, status=202)
        return web.json_response({"reason": "unregistered", "detail": "node is not registered"}, status=403)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/telemetry", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> FakeOracle:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def test_run_posts_the_stored_blob_and_survives_refusals(caplog: pytest.LogCaptureFixture) -> None:
    dht = FakeDht()
    with FakeOracle(accept=1) as oracle:
        tel = _telemetry(dht=dht, oracle_url=f"http://127.0.0.1:{oracle.port}/")

        async def main() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(tel.run(stop))
            for _ in range(200):  # 10 s at most
                if len(oracle.bodies) >= 3:
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(task, 5)

        began = time.monotonic()
        with caplog.at_level(logging.INFO, logger="dlis_market.node.telemetry"):
            asyncio.run(main())
    # three reports at a 0.2 s interval need ~0.4 s; 5 s is 10x that for a loaded machine, and a
    # worker that waited a whole default interval (60 s) before its first report still fails it
    assert len(oracle.bodies) >= 3 and time.monotonic() - began < 5
    assert tel.sent == 1 and tel.stored == dht.stores >= 3
    seqs = [decode_telemetry(b, 1 << 16, 1 << 18).report.seq for b in oracle.bodies]
    assert seqs == sorted(set(seqs))  # one seq per report, increasing
    assert dht.entries[NODE.address].value in oracle.bodies  # the POSTed bytes are the stored bytes
    refusals = [r for r in caplog.records if "refused" in r.message]
    assert len(refusals) == 1 and "403 unregistered" in refusals[0].message  # logged once, not per report


def test_unreachable_oracle_is_logged_and_the_dht_still_gets_the_report(caplog: pytest.LogCaptureFixture) -> None:
    dht = FakeDht()
    tel = _telemetry(dht=dht, oracle_url=f"http://127.0.0.1:{free_port()}")

    async def main() -> bytes:
        async with ClientSession() as session:
            return await tel.report_once(session)

    with caplog.at_level(logging.WARNING, logger="dlis_market.node.telemetry"):
        blob = asyncio.run(main())
    assert tel.sent == 0 and dht.entries[NODE.address].value == blob
    assert any("cannot reach" in r.message and "still goes on the DHT" in r.message for r in caplog.records)


def test_parse_telemetry_drops_malformed_entries() -> None:
    raw = SimpleNamespace(
        value={
            NODE.address: SimpleNamespace(value=b"blob"),
            "weird": SimpleNamespace(value={"not": "bytes"}),
        }
    )
    assert parse_telemetry(raw) == {NODE.address: b"blob"}
    assert parse_telemetry(None) == {} and parse_telemetry(SimpleNamespace(value=b"x")) == {}


# ---------------------------------------------------------------------- oracle DHT relay


class FakeService:
    """The part of OracleService the relay uses: ``intake``, ``submit_telemetry``, ``_lock``, ``config``."""

    def __init__(self, intake: TelemetryIntake) -> None:
        self.intake = intake
        self._lock = threading.Lock()
        self.config = SimpleNamespace(heartbeat_interval_s=0.1)

    def submit_telemetry(self, blob: bytes) -> Any:
        with self._lock:
            return self.intake.submit(blob)


def test_relay_submits_new_reports_once_and_skips_copies() -> None:
    dht = FakeDht()
    intake = _intake({NODE.address})
    relay = DhtTelemetryRelay(FakeService(intake), ["/ip4/127.0.0.1/tcp/1/p2p/x"], dht_factory=lambda _: dht)  # type: ignore[arg-type]
    asyncio.run(relay.start())
    node, stranger = _telemetry(dht=dht), _telemetry(dht=dht, key=STRANGER)

    first = asyncio.run(node.report_once(None))
    asyncio.run(stranger.report_once(None))
    dht.entries["junk"] = SimpleNamespace(value=b"not zstd")
    assert relay.poll_once() == Counter(submitted=1, refused=2)
    assert relay.poll_once() == Counter()  # same blobs still on the DHT: handled already
    assert intake.counts["unregistered"] == 1 and intake.counts["malformed"] == 1  # once per distinct blob

    intake.submit(asyncio.run(node.report_once(None)))  # the next report arrives over HTTP first
    assert relay.poll_once() == Counter(duplicate=1)  # ...and its DHT copy is skipped
    dht.entries[NODE.address] = SimpleNamespace(value=first)  # an old report put back on the DHT
    assert relay.poll_once() == Counter(duplicate=1)
    assert intake.counts["duplicate"] == intake.counts["superseded"] == 0 and intake.counts["accepted"] == 2
    asyncio.run(relay.close())


def test_relay_run_polls_until_stopped() -> None:
    dht = FakeDht()
    intake = _intake(None)
    relay = DhtTelemetryRelay(FakeService(intake), [], dht_factory=lambda _: dht)  # type: ignore[arg-type]
    node = _telemetry(dht=dht)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        for _ in range(3):
            await node.report_once(None)
            await asyncio.sleep(0.25)
        stop.set()
        await asyncio.wait_for(task, 5)
        await relay.close()

    asyncio.run(main())
    assert intake.counts["accepted"] == 3 and relay.dht is None


# ---------------------------------------------------------------------- worker CLI


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Root."""

    worker_cli.register(app)
    return app


def test_cli_byzantine_flag_is_hidden_and_warns(tmp_path: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(_cli(), ["start", "--help"]).output
    for flag in ("--oracle-url", "--reputation", "--telemetry-interval-s"):
        assert flag in help_text
    assert "--byzantine" not in help_text
    # refused right after the warning (no layers given), so no worker starts
    res = runner.invoke(_cli(), ["start", "--shards", ".", "--byzantine"], env={"DLIS_HOME": str(tmp_path)})
    assert res.exit_code == 1
    assert "TEST ONLY: this worker corrupts its outputs and will be slashed" in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reputation", "nope"], "is not an address"),
        (["--reputation", REPUTATION, "--oracle-url", "127.0.0.1:8090"], "must be an http(s) URL"),
        (["--telemetry-interval-s", "0"], "must be positive"),
    ],
)
def test_cli_refuses_bad_telemetry_flags(args: list[str], message: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        _cli(), ["start", "--shards", ".", "--layers", "0:2", *args], env={"DLIS_HOME": str(tmp_path)}
    )
    assert res.exit_code == 1 and message in res.output
