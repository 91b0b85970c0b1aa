"""The oracle's HTTP API (FastAPI, 127.0.0.1 by default).

==========================================  =====================================================
route                                       does
==========================================  =====================================================
``POST /v1/telemetry``                      body ``zstd(json(SignedTelemetry))``; 202 or a problem
``POST /v1/spot-checks``                    JSON :class:`SpotCheckEvidence`: ``pass`` or ``slashed``
``POST /v1/spot-checks/failures``           JSON :class:`SpotCheckFailure`: a failed verification
``POST /v1/spot-checks/fingerprint-passes`` JSON :class:`FingerprintCheckPass`: a passed verification
``POST /v1/observations``                   JSON :class:`ObservationBatch`: the broker's job figures
``GET /v1/aggregates[/{epoch}]``            the DP network figures (latest or of one epoch)
``GET /v1/nodes``                           per node: reputation_bps, reputation_epoch, failure_risk
``GET /v1/nodes/{node}``                    reputation (chain), failure risk, privacy account
``GET /v1/risk``                            failure risk of every node heard from
``GET /v1/proof/{node}/{epoch}``            Merkle proof of the node's leaf in that epoch
``GET /metrics``                            Prometheus text format
==========================================  =====================================================

Refusals are RFC 9457 problem JSON whose ``reason`` member is the machine-readable cause.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from web3 import Web3

from dlis_market.errors import ChainError
from dlis_market.http_metrics import HttpMetrics
from dlis_market.oracle.errors import EvidenceRefusedError, ProofNotFoundError
from dlis_market.oracle.service import OracleService
from dlis_market.protocol.errors import TelemetryRefusedError
from dlis_market.protocol.observations import ObservationBatch
from dlis_market.protocol.spot_checks import FingerprintCheckPass, RunnerStatement, SpotCheckEvidence, SpotCheckFailure
from dlis_market.types import PROBLEM_TYPE_BASE
from dlis_market.web_docs import serve_docs

M = TypeVar("M", bound=BaseModel)
S = TypeVar("S", bound=RunnerStatement)

TELEMETRY_STATUS = {
    "oversized": 413,
    "malformed": 400,
    "forged": 401,
    "unregistered": 403,
    "duplicate": 409,
    "superseded": 409,
    "stale": 422,
    "future": 422,
}


STATEMENT_MAX_BYTES = 16 << 10  # a SpotCheckFailure or FingerprintCheckPass is a few hundred bytes
OBSERVATIONS_MAX_BYTES = 128 << 10  # MAX_OBSERVATIONS signed observations of ~600 bytes


async def read_bounded(request: Request, limit: int) -> bytes | None:
    """The request body, or ``None`` (read no further) once it is known to exceed ``limit``
    bytes: from a declared Content-Length before reading anything, else while streaming."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def parse_body(model: type[M], body: bytes) -> M:
    """``model`` from a JSON body; a body that does not match is refused as ``malformed``."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise EvidenceRefusedError(
            "malformed",
            f"body is not a {model.__name__}: {exc.error_count()} errors, first at {first['loc']}: {first['msg']}",
        ) from exc


def problem(status: int, slug: str, title: str, detail: str, instance: str, **extra: Any) -> JSONResponse:
    body = {"type": PROBLEM_TYPE_BASE + slug, "title": title, "status": status, "detail": detail, "instance": instance}
    return JSONResponse({**body, **extra}, status_code=status, media_type="application/problem+json")


class _OracleCollector:
    """Reads the service's counters at scrape time (no global registry)."""

    def __init__(self, service: OracleService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        counts = CounterMetricFamily(
            "dlis_oracle_telemetry_reports",
            "Telemetry reports by outcome (accepted or refusal reason)",
            labels=["outcome"],
        )
        for outcome, n in self.service.intake.counts.items():
            counts.add_metric([outcome], n)
        yield counts
        yield CounterMetricFamily(
            "dlis_oracle_epochs_posted", "Epochs posted on chain", value=self.service.posted_epochs
        )
        yield CounterMetricFamily("dlis_oracle_slashes", "Slashes submitted", value=self.service.slashes)
        agg = self.service.latest_aggregates()
        if agg is not None and agg.availability is not None:
            yield GaugeMetricFamily(
                "dlis_oracle_availability", "DP mean node availability, latest epoch", value=agg.availability
            )


def create_app(service: OracleService) -> FastAPI:
    app = FastAPI(title="dlis oracle", version="1", docs_url=None, redoc_url=None)
    serve_docs(app)  # /docs and /redoc without public CDNs

    @app.exception_handler(ChainError)
    async def chain_failed(request: Request, exc: ChainError) -> JSONResponse:
        # the chain is down or a transaction reverted: the request itself may be fine, retry later
        return problem(503, "chain-unavailable", "Chain call failed", str(exc), str(request.url.path))

    registry = CollectorRegistry()
    registry.register(_OracleCollector(service))
    app.add_middleware(HttpMetrics, registry=registry, prefix="dlis_oracle")

    # Sync handlers run in FastAPI's thread pool, so chain calls do not block the event loop; the
    # routes that take a body from strangers read it themselves (bounded: read_bounded) and hand
    # parsing and checks to the pool too.
    @app.post("/v1/telemetry", status_code=202)
    async def telemetry_raw(request: Request) -> Any:
        limit = service.config.telemetry_max_bytes
        blob = await read_bounded(request, limit)
        if blob is None:
            service.intake.counts["oversized"] += 1
            return problem(
                413, "telemetry-oversized", "Telemetry refused", f"body over {limit} bytes", str(request.url.path),
                reason="oversized",
            )  # fmt: skip
        try:
            signed = await run_in_threadpool(service.submit_telemetry, blob)
        except TelemetryRefusedError as exc:
            return problem(
                TELEMETRY_STATUS[exc.reason],
                f"telemetry-{exc.reason}",
                "Telemetry refused",
                str(exc),
                str(request.url.path),
                reason=exc.reason,
            )
        return {"accepted": True, "node": signed.report.node, "seq": signed.report.seq}

    @app.exception_handler(EvidenceRefusedError)
    async def evidence_refused(request: Request, exc: EvidenceRefusedError) -> JSONResponse:
        # a spot check's evidence or failure report proves nothing: nothing slashed, nothing counted
        slug = f"evidence-{exc.reason.replace('_', '-')}"
        return problem(422, slug, "Evidence refused", str(exc), str(request.url.path), reason=exc.reason)

    async def evidence_intake(request: Request, limit: int, handle: Callable[[bytes], dict[str, Any]]) -> Any:
        """A stranger's body read up to ``limit`` bytes, then ``handle``d in the thread pool
        (parsing megabytes of hex and chain calls: off the event loop)."""
        body = await read_bounded(request, limit)
        if body is None:
            return problem(
                413, "evidence-oversized", "Evidence refused",
                f"body over {limit} bytes (oracle evidence_max_bytes); check a shorter call", str(request.url.path),
                reason="oversized",
            )  # fmt: skip
        return await run_in_threadpool(handle, body)

    @app.post("/v1/spot-checks")
    async def spot_check(request: Request) -> Any:
        def verdict(body: bytes) -> dict[str, Any]:
            outcome = service.report_spot_check(parse_body(SpotCheckEvidence, body))
            return {
                "outcome": outcome.outcome,
                "detail": outcome.detail,
                "slash": outcome.slash.as_dict() if outcome.slash else None,
            }

        return await evidence_intake(request, service.config.evidence_max_bytes, verdict)

    def runner_statement(path: str, kind: type[S], report: Callable[[S], bool]) -> None:
        """``POST path``: a runner's signed statement about one call, counted once:
        ``{"recorded": bool, "node": ...}``."""

        async def statement(request: Request) -> Any:
            def record(body: bytes) -> dict[str, Any]:
                said = parse_body(kind, body)
                return {"recorded": report(said), "node": said.node}

            return await evidence_intake(request, min(service.config.evidence_max_bytes, STATEMENT_MAX_BYTES), record)

        app.post(path, name=kind.__name__)(statement)

    runner_statement("/v1/spot-checks/failures", SpotCheckFailure, service.report_failure)
    runner_statement("/v1/spot-checks/fingerprint-passes", FingerprintCheckPass, service.report_fingerprint_pass)

    @app.post("/v1/observations")
    async def observations(request: Request) -> Any:
        def record(body: bytes) -> dict[str, Any]:
            batch = parse_body(ObservationBatch, body)
            return {"recorded": service.report_observations(batch), "of": len(batch.observations)}

        return await evidence_intake(request, min(service.config.evidence_max_bytes, OBSERVATIONS_MAX_BYTES), record)

    @app.get("/v1/aggregates")
    def aggregates_latest(request: Request) -> Any:
        agg = service.latest_aggregates()
        if agg is None:
            return problem(404, "no-aggregates", "No aggregates yet", "no epoch was closed yet", str(request.url.path))
        return agg.model_dump()

    @app.get("/v1/aggregates/{epoch}")
    def aggregates_at(epoch: int, request: Request) -> Any:
        agg = service.aggregates_of(epoch)
        if agg is None:
            return problem(
                404,
                "no-aggregates",
                "No aggregates",
                f"epoch {epoch} was not closed by this oracle",
                str(request.url.path),
            )
        return agg.model_dump()

    @app.get("/v1/risk")
    def risks() -> dict[str, float]:
        return service.failure_risks()

    @app.get("/v1/nodes")
    def nodes() -> dict[str, dict[str, float | int]]:
        return service.scheduler_view()

    @app.get("/v1/nodes/{node}")
    def node_info(node: str, request: Request) -> Any:
        if not Web3.is_address(node):
            return problem(400, "bad-address", "Bad address", f"{node!r} is not an address", str(request.url.path))
        node = Web3.to_checksum_address(node)
        score, epoch = service.reputation.latest(node)
        epoch_now = service.epoch_of(service.clock())
        return {
            "node": node,
            "reputation_bps": score,
            "reputation_epoch": epoch,
            "failure_risk": service.failure_risk(node),
            "privacy": service.accountant.account(node, epoch_now),
        }

    @app.get("/v1/proof/{node}/{epoch}")
    def proof(node: str, epoch: int, request: Request) -> Any:
        if not Web3.is_address(node):
            return problem(400, "bad-address", "Bad address", f"{node!r} is not an address", str(request.url.path))
        try:
            return service.store.proof(node, epoch).model_dump()
        except ProofNotFoundError as exc:
            return problem(404, "no-proof", "No proof", str(exc), str(request.url.path))

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
