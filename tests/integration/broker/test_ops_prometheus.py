"""The operations kit against a real Prometheus: ``ops/prometheus.yml`` scrapes a live broker,
oracle and worker exporter, and every metric the Grafana dashboard queries exists there, every
panel's expression evaluates, and one paid job counts once in ``dlis_broker_jobs_total``."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from dlis_market.broker.app import create_app
from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.node.metrics import WorkerMetrics
from dlis_market.oracle.server import create_app as create_oracle_app
from dlis_market.oracle.service import OracleService
from dlis_market.protocol.telemetry import TelemetryMetrics, TelemetryReport, encode_telemetry, sign_telemetry
from dlis_market.settings import Settings
from dlis_market.types import model_id
from tests.integration.broker.conftest import free_port
from tests.integration.conftest import DEV_PUBLISHER

OPS = Path(__file__).resolve().parents[3] / "ops"
PROMETHEUS = "/usr/bin/prometheus"  # Debian's prometheus, installed by `make setup`
UNIT = 10**18
MODEL = "smollm2-135m"


def _paid_job(market, service, client, url: str) -> None:  # type: ignore[no-untyped-def]
    jm = market.market()
    jm.deposit(client, 10 * UNIT)
    auth = JobAuthorization(
        client.address, market.broker.address, bytes.fromhex(model_id(MODEL, DEV_PUBLISHER)[2:]), UNIT,
        secrets.randbits(128), market.client.timestamp() + 1200,
    )  # fmt: skip
    sig = sign_authorization(client.key, jm.domain(), auth)
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4,
            "authorization": {"client": client.address, "nonce": str(auth.nonce), "max_cost": str(UNIT),
                              "deadline": auth.deadline, "signature": sig.hex()}}  # fmt: skip
    with httpx.Client(base_url=url, timeout=60) as http:
        res = http.post("/v1/jobs", json=body)
        assert res.status_code == 201, res.text
        assert len(service.settler.settle_once().settled_batches) == 1
        assert http.get("/v1/jobs/" + res.json()["id"]).json()["status"] == "settled"


def _oracle(market, tmp_path):  # type: ignore[no-untyped-def]
    data = market.settings.model_dump()
    data["oracle"].update({"state_dir": tmp_path / "oracle"})
    service = OracleService(Settings.model_validate(data), market.client, market.oracle)
    node = market.enroll_node(market.new_funded_account(300 * UNIT), stake=300 * UNIT)
    report = TelemetryReport(
        node=node.address, seq=1, timestamp=int(time.time()),
        metrics=TelemetryMetrics(uptime_s=60.0, advertised_tps=50.0, measured_tps=40.0, free_kv_slots=2),
    )  # fmt: skip
    return service, encode_telemetry(sign_telemetry(node.key, service.domain, report))


def _grafana_queries() -> list[str]:
    dashboard = json.loads((OPS / "grafana" / "dlis_market.json").read_text())
    jobs = {"$broker": "dlis-broker", "$worker": "dlis-worker", "$oracle": "dlis-oracle"}
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, job in jobs.items():
                expr = expr.replace(var, job)
            out.append(expr)
    return out


def test_prometheus_scrapes_what_grafana_queries(broker_env, live_server, tmp_path):
    assert shutil.which("promtool"), "promtool missing: run `make setup` (Debian prometheus)"
    check = subprocess.run(["promtool", "check", "config", str(OPS / "prometheus.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    market, service, backend, ops, nodes, client = broker_env
    broker = live_server(create_app(service, settle_in_background=False))
    oracle_service, telemetry = _oracle(market, tmp_path)
    oracle = live_server(create_oracle_app(oracle_service))
    posted = httpx.post(oracle.url + "/v1/telemetry", content=telemetry, headers={"content-type": "application/zstd"})
    assert posted.status_code == 202, posted.text
    worker = WorkerMetrics(kv_used=lambda: 1024.0, kv_capacity=4096.0, sessions=lambda: 1.0)
    worker.dht_peers.set(3)
    worker.step_seconds.labels("decode").observe(0.02)
    worker_port = worker.serve("127.0.0.1", 0)
    _paid_job(market, service, client, broker.url)
    for path in ("/v1/models", "/no-such-route"):  # HTTP metrics: a route template and the unmatched bucket
        httpx.get(broker.url + path)

    config = yaml.safe_load((OPS / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    targets = {"dlis-broker": broker.port, "dlis-oracle": oracle.port, "dlis-worker": worker_port}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(tmp_path / "prometheus.log", "w") as log:
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--web.listen-address=127.0.0.1:{port}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=10)
        deadline = time.monotonic() + 60
        while True:
            try:  # Prometheus answers 503 until its storage is ready
                active = api.get("/targets").raise_for_status().json()["data"]["activeTargets"]
                if len(active) == 3 and all(t["health"] == "up" for t in active):
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline or prom.poll() is not None:
                pytest.fail(f"Prometheus targets not up: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.5)
        time.sleep(1.5)  # one more scrape after the first, so rate() has two samples

        queries = _grafana_queries()
        names = sorted({m for q in queries for m in re.findall(r"\b(dlis_[a-z0-9_]+)", q)})
        missing = [n for n in names if not api.get("/query", params={"query": n}).json()["data"]["result"]]
        assert not missing, f"the dashboard queries metrics nobody exports: {missing}"
        for q in queries:
            answer = api.get("/query", params={"query": q}).json()
            assert answer["status"] == "success", (q, answer)

        jobs = api.get("/query", params={"query": "sum(dlis_broker_jobs_total)"}).json()["data"]["result"]
        assert float(jobs[0]["value"][1]) == 1.0  # one settled job is one job
        routes = api.get("/query", params={"query": "dlis_broker_http_requests_total"}).json()["data"]["result"]
        seen = {(r["metric"]["route"], r["metric"]["status"]) for r in routes}
        assert ("/v1/jobs", "201") in seen and ("unmatched", "404") in seen
    finally:
        prom.terminate()
        prom.wait(timeout=20)
