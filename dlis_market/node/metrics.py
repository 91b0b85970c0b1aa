"""Prometheus metrics of a worker, served on 127.0.0.1 when ``node.metrics_port`` is set.

Names match ``ops/grafana/dlis_market.json``: DHT peers, KV-cache bytes in use and capacity,
open sessions, and the time of each stage step by phase (prefill: any session sent more than one
token; decode: one token each).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WorkerMetrics:
    def __init__(self, kv_used: Callable[[], float], kv_capacity: float, sessions: Callable[[], float]):
        self.registry = CollectorRegistry()
        self.dht_peers = Gauge(
            "dlis_worker_dht_peers", "libp2p peers this worker is connected to", registry=self.registry
        )
        used = Gauge("dlis_worker_kv_cache_used_bytes", "KV cache held by open sessions", registry=self.registry)
        used.set_function(kv_used)
        cap = Gauge(
            "dlis_worker_kv_cache_capacity_bytes", "KV cache of max sessions at max length", registry=self.registry
        )
        cap.set(kv_capacity)
        open_sessions = Gauge("dlis_worker_sessions", "open inference sessions", registry=self.registry)
        open_sessions.set_function(sessions)
        self.step_seconds = Histogram(
            "dlis_worker_stage_step_seconds",
            "time of one forward pass of this stage",
            ["phase"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter on ``host:port`` (0: a free port); returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


def kv_capacity_bytes(config: object, layers: int, max_sessions: int, max_tokens: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for every session at its maximum length."""
    heads = int(getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None) or 1)
    hidden = int(getattr(config, "hidden_size", 0))
    head_dim = int(
        getattr(config, "head_dim", None) or hidden // max(int(getattr(config, "num_attention_heads", 1)), 1)
    )
    return 2 * heads * head_dim * dtype_bytes * layers * max_sessions * max_tokens
