"""Native job API: quotes, paid jobs, their status and token streams (SSE)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from dlis_market.broker.deps import ServiceDep
from dlis_market.broker.ledger import JobRow, Ledger
from dlis_market.broker.problems import ProblemError
from dlis_market.broker.schemas import JobCreate, JobPublic, Quote, QuoteRequest, ReceiptPublic, SettlementPublic

router = APIRouter(prefix="/v1", tags=["jobs"])


def job_public(ledger: Ledger, row: JobRow) -> JobPublic:
    batch = ledger.get_batch(row.batch_id) if row.batch_id else None
    tps = None
    if row.latency_ms and row.ttft_ms is not None and row.completion_tokens > 1:
        decode_ms = row.latency_ms - row.ttft_ms
        tps = (row.completion_tokens - 1) / (decode_ms / 1000) if decode_ms > 0 else None
    return JobPublic(
        id=row.id,
        status=row.status,
        model=row.model,
        client=row.client,
        nonce=row.nonce,
        route=json.loads(row.route_json) if row.route_json else None,
        fallback=row.fallback,
        answer=row.answer,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        cost=row.cost,
        fee=row.fee,
        max_cost=row.max_cost,
        ttft_ms=row.ttft_ms,
        latency_ms=row.latency_ms,
        tokens_per_s=tps,
        receipts=[
            ReceiptPublic(
                stage=r.stage,
                node=r.node,
                start=r.start,
                end=r.end,
                tokens=r.tokens,
                output_hash=r.output_hash,
                amount=r.amount,
                signature=r.signature,
            )
            for r in row.receipts
        ],
        settlement=SettlementPublic(
            batch_id=row.batch_id,
            status=batch.status if batch else None,
            tx_hash=batch.tx_hash if batch else None,
            block=batch.block if batch else None,
        ),
        error=row.error,
        created_at=row.created_at,
    )


def sse(events: AsyncIterator[dict[str, Any]], status_code: int = 200) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for ev in events:
            yield f"event: {ev['type']}\ndata: {json.dumps(ev)}\n\n".encode()

    return StreamingResponse(
        body(), status_code=status_code, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


@router.post("/quotes", response_model=Quote)
async def create_quote(body: QuoteRequest, service: ServiceDep) -> Quote:
    """Price and route a job before committing to it (nothing is signed or run)."""
    messages = [m.model_dump() for m in body.messages] if body.messages is not None else None
    return await service.quote(body.model, body.prompt, messages, body.max_tokens, body.policy)


@router.post(
    "/jobs", response_model=JobPublic, status_code=201, responses={201: {"content": {"text/event-stream": {}}}}
)
async def create_job(body: JobCreate, service: ServiceDep) -> Any:
    """Run a paid job under the client's EIP-712 authorization. With `stream: true` the response is
    a server-sent event stream of tokens; otherwise the job is returned when it finishes."""
    row = await service.submit(body)
    if body.stream:
        return sse(service.events(row.id), status_code=201)
    await service.wait(row.id)
    done = service.ledger.get_job(row.id)
    assert done is not None
    return job_public(service.ledger, done)


@router.get("/jobs", response_model=list[JobPublic])
async def list_jobs(service: ServiceDep, limit: int = 50) -> list[JobPublic]:
    """Most recent jobs first."""
    return [job_public(service.ledger, r) for r in service.ledger.recent_jobs(min(max(limit, 1), 500))]


@router.get("/jobs/{job_id}", response_model=JobPublic)
async def get_job(job_id: str, service: ServiceDep) -> JobPublic:
    """Status, route, tokens, cost, receipts and settlement transaction of a job."""
    row = service.ledger.get_job(job_id)
    if row is None:
        raise ProblemError(404, "unknown-job", "Unknown job", f"no job {job_id}")
    return job_public(service.ledger, row)


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, service: ServiceDep) -> StreamingResponse:
    """Server-sent events of a job: every token so far, then live ones until it ends."""
    if service.ledger.get_job(job_id) is None:
        raise ProblemError(404, "unknown-job", "Unknown job", f"no job {job_id}")
    return sse(service.events(job_id))
