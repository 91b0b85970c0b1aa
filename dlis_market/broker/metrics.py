"""Prometheus metrics of the broker, in a registry of their own (one per app, so tests can build
several apps in one process), and a ``/metrics`` route any FastAPI app can mount.

Job metrics are fed from the ledger: :meth:`BrokerMetrics.observe_job` is idempotent per job and
status, so it can be called from the service when a job ends and again by the scrape-time sync
(:meth:`BrokerMetrics.sync`) without counting anything twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dlis_market.broker.ledger import JobRow, JobStatus, Ledger

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)
# Jobs whose counting the metrics remember (several times what a scrape-time sync reads).
MAX_REMEMBERED = 8192
TERMINAL = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.UNPAYABLE, JobStatus.SETTLED)


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "dlis_broker_jobs", "Jobs by how their run ended (completed or failed), each counted once",
            ["status", "model"], registry=r,
        )  # fmt: skip
        self.settlements = Counter(
            "dlis_broker_settlements", "Completed jobs by settlement result (settled or unpayable)",
            ["result", "model"], registry=r,
        )  # fmt: skip
        self.tokens = Counter("dlis_broker_tokens", "Tokens processed by finished jobs", ["kind", "model"], registry=r)
        self.latency = Histogram(
            "dlis_broker_job_latency_seconds", "Job wall time, admission to last token", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "dlis_broker_time_to_first_token_seconds", "Time to the first token", ["model"],
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tps = Histogram(
            "dlis_broker_decode_tokens_per_second", "Decode throughput per job", ["model"],
            buckets=TPS_BUCKETS, registry=r,
        )  # fmt: skip
        self.cost = Counter("dlis_broker_job_cost_units", "Stage charges of finished jobs (token units)", registry=r)
        self.settlement_lag = Gauge(
            "dlis_broker_settlement_lag_seconds", "Age of the oldest completed job not yet settled", registry=r
        )
        self.unsettled = Gauge("dlis_broker_unsettled_jobs", "Completed jobs waiting for settlement", registry=r)
        self.spot_checks = Counter(
            "dlis_broker_spot_checks", "Spot checks of stage calls by outcome (pass, slashed, refused, skipped, error)",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.running = Gauge("dlis_broker_jobs_running", "Job slots taken (admitted jobs not yet ended)", registry=r)
        self.waiting = Gauge("dlis_broker_admission_waiting", "Requests waiting in line for a job slot", registry=r)
        self.overloaded = Counter(
            "dlis_broker_admission_refused", "Requests answered 429 (queue full, wait ran out, workers busy)",
            registry=r,
        )  # fmt: skip
        self.scrape_time = Gauge("dlis_broker_last_scrape_timestamp_seconds", "Time of the last scrape", registry=r)
        # Jobs already counted, by id: the statuses counted and whether its figures were measured.
        # Only the most recent MAX_REMEMBERED stay (memory is flat): the scrape-time sync reads
        # the ledger's last few hundred jobs, all of which are among them.
        self._seen: OrderedDict[str, tuple[set[str], bool]] = OrderedDict()

    def observe_job(self, row: JobRow) -> None:
        """Count a job once by how its run ended (``jobs_total{status=completed|failed}``; a job
        first seen already settled or unpayable ran to completion) and once more by its settlement
        (``settlements_total{result=settled|unpayable}``), so summing ``jobs_total`` over statuses
        counts jobs, not status changes. Latencies and tokens are measured once."""
        if row.status not in TERMINAL:
            return
        outcome = JobStatus.FAILED if row.status == JobStatus.FAILED else JobStatus.COMPLETED
        settled = row.status if row.status in (JobStatus.SETTLED, JobStatus.UNPAYABLE) else None
        counted, measured = self._seen.pop(row.id, (set(), False))
        self._seen[row.id] = (counted, measured or row.status != JobStatus.FAILED)
        while len(self._seen) > MAX_REMEMBERED:
            self._seen.popitem(last=False)
        if outcome not in counted:
            counted.add(outcome)
            self.jobs.labels(outcome, row.model).inc()
        if settled is not None and settled not in counted:
            counted.add(settled)
            self.settlements.labels(settled, row.model).inc()
        if row.status == JobStatus.FAILED or measured:
            return
        self.tokens.labels("prompt", row.model).inc(row.prompt_tokens)
        self.tokens.labels("completion", row.model).inc(row.completion_tokens)
        if row.latency_ms is not None:
            self.latency.labels(row.model).observe(row.latency_ms / 1000)
        if row.ttft_ms is not None:
            self.ttft.labels(row.model).observe(row.ttft_ms / 1000)
            decode_ms = (row.latency_ms or 0) - row.ttft_ms
            if row.completion_tokens > 1 and decode_ms > 0:
                self.tps.labels(row.model).observe((row.completion_tokens - 1) / (decode_ms / 1000))
        self.cost.inc(row.cost or 0)

    def sync(self, ledger: Ledger, now: float | None = None, window: int = 500) -> None:
        """Bring the metrics up to date with the ledger's recent jobs (called at scrape time)."""
        now = time.time() if now is None else now
        rows = ledger.recent_jobs(window)
        for row in rows:
            self.observe_job(row)
        waiting = [r for r in rows if r.status == "completed"]
        self.unsettled.set(len(waiting))
        self.settlement_lag.set(max((now - r.updated_at for r in waiting), default=0.0))
        self.scrape_time.set(now)


def metrics_route(registry: CollectorRegistry, before: Callable[[], None] | None = None) -> APIRouter:
    """An APIRouter with ``GET /metrics`` serving ``registry`` (``before`` runs first, to refresh
    gauges). Workers and the oracle mount it on their own apps with their own registries."""
    router = APIRouter(tags=["ops"])

    @router.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        if before is not None:
            before()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router


def broker_metrics_router(metrics: BrokerMetrics, ledger: Ledger) -> APIRouter:
    return metrics_route(metrics.registry, before=lambda: metrics.sync(ledger))
