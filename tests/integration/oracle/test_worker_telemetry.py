"""Real workers send signed telemetry to a real oracle on Anvil, over HTTP and through the DHT.

Two tiny-Llama worker processes serve [0, 2) and [2, 4) with ``--telemetry-interval-s 1``:
``http`` POSTs to the oracle (and stores on the DHT), ``dht`` only stores on the DHT. ``dht`` is
staked and registered through the CLI up front; ``http`` only once the oracle has refused it as
unregistered. The oracle runs first in process (uvicorn in a thread: HTTP intake only), then as
`dlis oracle start --initial-peer` (HTTP + DHT relay) on the same port, so the workers keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from dlis_market.chain.anvil import free_port
from dlis_market.chain.devnet import LocalMarket
from dlis_market.cli.main import app as dlis_cli
from dlis_market.node.driver import JobSession, JobSpec, PipelineDriver
from dlis_market.oracle.server import create_app
from dlis_market.oracle.service import OracleService
from dlis_market.oracle.store import DB_FILE, OracleStore
from dlis_market.protocol.telemetry import SignedTelemetry
from dlis_market.settings import Settings

sys.path.insert(0, str(Path(__file__).parents[1] / "node"))
from node_helpers import MODEL, Swarm, WorkerProc, _wait_ready, driver_settings, tiny_shards, wait_for_spans

PROMPT = [1, 2, 3, 4, 5]
NEW = 4


@dataclass
class Fleet:
    market: LocalMarket
    swarm: Swarm
    port: int  # the oracle's port: the workers POST there
    workers: dict[str, WorkerProc]
    registered: set[str] = field(default_factory=set)

    def address(self, name: str) -> str:
        return str(self.workers[name].info["node_address"])

    def register(self, name: str, dev_index: int) -> None:
        """The operator (Anvil account ``dev_index``) stakes and registers the worker's node key (CLI)."""
        if name in self.registered:
            return
        w = self.workers[name]
        (w.home / "deployments").mkdir(exist_ok=True)
        manifest = self.market.settings.deployments_dir / "31337.json"
        shutil.copy(manifest, w.home / "deployments" / "31337.json")
        env = {"DLIS_HOME": str(w.home), "DLIS_CHAIN__RPC_URL": self.market.settings.chain.rpc_url}
        _cli(env, "chain", "faucet", self.market.accounts[dev_index].address, "500")
        _cli(env, "node", "stake", "200", "--account", f"dev:{dev_index}")
        register = ["node", "register", "--account", f"dev:{dev_index}", "--node-key", "node"]
        register += ["--node-password-file", str(w.home / "password"), "--peer-id", w.info["peer_id"]]
        _cli(env, *register, "--attestation-hash", w.info["attestation_hash"])
        self.registered.add(name)


def _cli(env: dict[str, str], *args: str) -> None:
    res = CliRunner().invoke(dlis_cli, list(args), env=env)
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def fleet(market_session: LocalMarket, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    market = market_session
    snap = market.snapshot()  # the registrations are undone for the rest of the session
    root = tmp_path_factory.mktemp("telemetry-fleet")
    shards = tiny_shards(root, [(0, 2), (2, 4)], name=MODEL)
    port = free_port()
    common = ["--reputation", market.client.deployment.address_of("ReputationOracle"), "--telemetry-interval-s", "1"]
    try:
        with Swarm(root) as swarm:
            launched = {
                "http": swarm.launch(
                    shards,
                    "0:2",
                    "http",
                    *common,
                    "--oracle-url",
                    f"http://127.0.0.1:{port}",
                    "--session-idle-s",
                    "2",
                    "-v",
                ),
                "dht": swarm.launch(shards, "2:4", "dht", *common, "-v"),
            }
            for w in launched.values():
                w.info = _wait_ready(w.proc, 120, w.log_path)
            fleet = Fleet(market, swarm, port, launched)
            fleet.register("dht", 5)
            yield fleet
    finally:
        market.revert(snap)


def _oracle_settings(market: LocalMarket, state_dir: Path, **oracle: Any) -> Settings:
    data = market.settings.model_dump()
    data["oracle"].update({"state_dir": state_dir, "heartbeat_interval_s": 1.0, **oracle})
    return Settings.model_validate(data)


def _wait(what: str, check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class ThreadedOracle:
    """``create_app(service)`` served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, service: OracleService, port: int) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedOracle:
        self.thread.start()
        _wait("uvicorn", lambda: self.server.started, 10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _reports(service: OracleService, node: str) -> list[SignedTelemetry]:
    return [r.telemetry for r in list(service._pending) if r.telemetry.report.node == node]


async def _run_job(fleet: Fleet, job_id: bytes) -> None:
    driver = await PipelineDriver.create(fleet.swarm.initial_peers, driver_settings())
    try:
        await wait_for_spans(driver, MODEL, 2)
        tokens, receipts = await driver.generate(
            JobSpec(model=MODEL, prompt_ids=PROMPT, max_new_tokens=NEW, job_id=job_id)
        )
        assert len(tokens) == NEW and len(receipts) == 2
    finally:
        await driver.close()


async def _abandon_job(fleet: Fleet, job_id: bytes) -> None:
    """Open a session, take one token, go away without closing it (a client or driver that died)."""
    driver = await PipelineDriver.create(fleet.swarm.initial_peers, driver_settings())
    try:
        await wait_for_spans(driver, MODEL, 2)
        session = JobSession(driver, JobSpec(model=MODEL, prompt_ids=PROMPT, max_new_tokens=NEW, job_id=job_id))
        await session.establish()
        await anext(session.tokens())
    finally:
        await driver.close()


def test_worker_is_refused_until_registered_then_its_signed_reports_are_accepted(fleet: Fleet, tmp_path: Path) -> None:
    settings = _oracle_settings(fleet.market, tmp_path / "oracle")
    service = OracleService(settings, fleet.market.client, fleet.market.oracle)
    http, dht = fleet.address("http"), fleet.address("dht")
    worker = fleet.workers["http"]
    with ThreadedOracle(service, fleet.port):
        if "http" not in fleet.registered:  # the other test may have registered it already
            _wait("a refusal of the unregistered worker", lambda: service.intake.counts["unregistered"] >= 2)
            assert http not in service.intake.last_seq
            _wait("the refusal in its log", lambda: "oracle refused it (403 unregistered)" in worker.log(), 5)
            assert worker.proc.poll() is None  # refused, still serving
            fleet.register("http", 4)
        _wait("two reports of the registered worker", lambda: len(_reports(service, http)) >= 2)

        job_id = secrets.token_bytes(32)
        asyncio.run(_run_job(fleet, job_id))
        _wait("the job in a report", lambda: any(r.report.metrics.jobs for r in _reports(service, http)))
        # a session its opener never closes is evicted after --session-idle-s and reported as failed
        abandoned = secrets.token_bytes(32)
        asyncio.run(_abandon_job(fleet, abandoned))
        failed = [j for r in _reports(service, http) for j in r.report.metrics.jobs if not j.ok]
        _wait(
            "the abandoned session reported as failed",
            lambda: any(j.job_id == "0x" + abandoned.hex() and not j.ok
                        for r in _reports(service, http) for j in r.report.metrics.jobs),
        )  # fmt: skip
        assert failed == []  # nothing failed before it

    reports = _reports(service, http)
    seqs = [r.report.seq for r in reports]
    assert seqs == sorted(set(seqs))
    first = reports[0].report.metrics
    assert first.served is not None and (first.served.start, first.served.end) == (0, 2)
    assert first.advertised_tps == pytest.approx(worker.info["throughput"])
    assert first.gflops and first.gflops > 0 and first.memory_mib and first.memory_mib > 0
    assert first.free_kv_slots == 16  # inference.max_sessions, nothing open
    uptimes = [r.report.metrics.uptime_s for r in reports]
    assert uptimes == sorted(uptimes)
    done = next(r.report.metrics for r in reports if r.report.metrics.jobs)
    (job,) = done.jobs
    assert (job.job_id, job.ok, job.tokens) == ("0x" + job_id.hex(), True, len(PROMPT) + NEW - 1)
    worked = [r.report.metrics for r in reports if r.report.metrics.measured_tps > 0]
    assert worked and sum(len(m.latencies_ms) for m in worked) >= NEW - 1  # one per decode step
    assert dht not in service.intake.last_seq  # the DHT-only worker never POSTs
    assert service.intake.counts["duplicate"] == service.intake.counts["forged"] == 0


def _metric(text: str, outcome: str) -> float:
    line = next(
        x for x in text.splitlines() if x.startswith(f'dlis_oracle_telemetry_reports_total{{outcome="{outcome}"}}')
    )
    return float(line.split()[-1])


def test_oracle_relays_dht_telemetry_without_counting_copies_as_replays(fleet: Fleet, tmp_path: Path) -> None:
    fleet.register("http", 4)  # (no-op when the first test did it)
    state = tmp_path / "oracle"
    env = {**os.environ, **fleet.market.settings.to_env(), "DLIS_ORACLE__HEARTBEAT_INTERVAL_S": "1"}
    cmd = [sys.executable, "-m", "dlis_market.cli.main", "oracle", "start", "--port", str(fleet.port)]
    cmd += ["--state-dir", str(state)]
    for peer in fleet.swarm.initial_peers:
        cmd += ["--initial-peer", peer]
    log = tmp_path / "oracle.log"
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{fleet.port}"
    http, dht = fleet.address("http"), fleet.address("dht")

    def accepted() -> dict[str, list[dict[str, Any]]]:
        """The reports the oracle accepted, from its database (read while it runs: WAL)."""
        if not (state / DB_FILE).exists():
            return {}
        store = OracleStore(f"sqlite:///{state / DB_FILE}")
        try:
            received = store.reports_after(-1)
        finally:
            store.close()
        out: dict[str, list[dict[str, Any]]] = {}
        for r in received:
            out.setdefault(r.telemetry.report.node, []).append(r.telemetry.report.model_dump(mode="json"))
        return out

    try:
        _wait("the oracle", lambda: proc.poll() is None and _up(base), 30)
        _wait("2 relayed reports of the DHT-only worker", lambda: len(accepted().get(dht, [])) >= 2, 30)
        time.sleep(1.5)  # more relay passes over the copies still on the DHT
        got = accepted()
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        assert set(got) == {http, dht}
        assert {(r["metrics"]["served"]["start"], r["metrics"]["served"]["end"]) for r in got[dht]} == {(2, 4)}
        for reports in got.values():  # each report accepted once, whichever way it came first
            seqs = [r["seq"] for r in reports]
            assert seqs == sorted(set(seqs))
        # the http worker's reports came both ways (and, queued in its outbox while this oracle was
        # not yet up, late): copies are answered duplicate/superseded and counted once above; no
        # report was refused for anything else
        for reason in ("forged", "unregistered", "stale", "future", "malformed"):
            assert _metric(metrics, reason) == 0.0, reason
        assert _metric(metrics, "accepted") >= len(got[http]) + len(got[dht])
        assert set(httpx.get(f"{base}/v1/risk", timeout=5).json()) == {http, dht}
    finally:
        proc.send_signal(signal.SIGTERM)  # the oracle alone: it must stop its relay's DHT daemon itself
        try:
            code = proc.wait(timeout=30)
            leftovers = _group_alive(proc.pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "telemetry also from the DHT via" in " ".join(text.split())
    assert not leftovers, f"processes left running after the oracle stopped: {leftovers}"


def _group_alive(pgid: int) -> list[str]:
    """Commands of the processes still in process group ``pgid`` (the relay's DHT and p2pd)."""
    time.sleep(0.5)
    out = subprocess.run(["ps", "-e", "-o", "pgid=,stat=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
    return [row[2] for row in rows if len(row) == 3 and row[0] == str(pgid) and not row[1].startswith("Z")]


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v1/risk", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
