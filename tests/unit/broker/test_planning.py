"""Failure risk for routing comes from the oracle's /v1/nodes, cached, with a safe default."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from dlis_market.broker.planning import OracleRisk


def test_oracle_risk_reads_caches_and_falls_back():
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            calls.append(self.path)
            body = json.dumps({"0xAbC": {"reputation_bps": 9000, "reputation_epoch": 3, "failure_risk": 0.25}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        risk = OracleRisk(f"http://127.0.0.1:{server.server_port}", default=0.01, ttl_s=60)
        assert risk("0xabc") == 0.25  # addresses compare case-insensitively
        assert risk("0xdef") == 0.01  # never heard of: the default
        assert calls == ["/v1/nodes"]  # cached
    finally:
        server.shutdown()
    down = OracleRisk(f"http://127.0.0.1:{server.server_port}", default=0.05, ttl_s=0)
    assert down("0xabc") == 0.05


def test_standing_cache_looks_a_node_up_once_however_many_plans_miss_together():
    """Plans run in worker threads: when a node's standing expires, the jobs planned meanwhile must
    not each send their own chain reads (a burst of RPCs per refresh that delayed admission)."""
    from concurrent.futures import ThreadPoolExecutor

    from dlis_market.broker.planning import CachedStanding, NodeStanding

    lookups: list[str] = []
    gate = threading.Event()

    def slow_lookup(node: str) -> NodeStanding:
        lookups.append(node)
        gate.wait(5)  # a chain read under load
        return NodeStanding(True, 9000 + len(lookups), "0x" + "00" * 32)

    cache = CachedStanding(slow_lookup, ttl_s=0.5)
    with ThreadPoolExecutor(8) as pool:
        first = [pool.submit(cache, "0xa") for _ in range(8)]  # nothing cached: all wait for one read
        time.sleep(0.2)
        gate.set()
        assert {f.result(5).reputation_bps for f in first} == {9001}
        assert lookups == ["0xa"]
        time.sleep(0.6)  # expired: one caller refreshes, the others keep the last value meanwhile
        gate.clear()
        started = time.monotonic()
        stale = [pool.submit(cache, "0xa") for _ in range(8)]
        time.sleep(0.2)
        answered = [f.result(0) for f in stale if f.done()]
        assert len(answered) == 7 and {s.reputation_bps for s in answered} == {9001}, answered
        assert time.monotonic() - started < 1.0
        gate.set()
        assert {f.result(5).reputation_bps for f in stale} == {9001, 9002}
        assert lookups == ["0xa", "0xa"]
    assert cache("0xa").reputation_bps == 9002  # the refreshed value, cached
