"""Failure risk for routing comes from the oracle's /v1/nodes, cached, with a safe default."""

from __future__ import annotations

import json
import threading
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
