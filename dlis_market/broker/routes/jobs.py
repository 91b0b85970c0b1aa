"""Native job API: quotes, paid jobs, their status and token streams (SSE).

A job's prompt and answer belong to its client. Anyone sees a job's route, cost, receipts and
settlement; its content (the request, the answer, the token events) only a request that proves it
comes from the job's client: an ``X-DLIS-Job-Read: <expiry>:<signature>`` header (or ``read``
query parameter) carrying the client's EIP-712 ``JobRead`` signature (:mod:`dlis_market.broker.auth`),
or ``Authorization: Bearer`` with the API key the job was run under. The response to a job's own
submit request carries its content too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from dlis_market.broker.apikeys import resolve_api_key
from dlis_market.broker.auth import recover_authorization, verify_job_read
from dlis_market.broker.deps import ServiceDep
from dlis_market.broker.errors import client_left, not_your_job, unknown_job
from dlis_market.broker.job_types import Idempotency
from dlis_market.broker.ledger import JobRow, Ledger
from dlis_market.broker.schemas import JobCreate, JobPublic, Quote, QuoteRequest, ReceiptPublic, SettlementPublic
from dlis_market.broker.service import BrokerService
from dlis_market.broker.settlement import signed_job

router = APIRouter(prefix="/v1", tags=["jobs"])

ReadHeader = Annotated[str | None, Header(alias="X-DLIS-Job-Read", max_length=200)]
ReadQuery = Annotated[str | None, Query(alias="read", max_length=200)]
AuthHeader = Annotated[str | None, Header(max_length=200)]
IdempotencyHeader = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=256)]


def body_hash(body: BaseModel, kind: str = "") -> str:
    """What identifies a request for idempotency: its route kind and its parsed body."""
    return "0x" + hashlib.sha256(f"{kind}\n{body.model_dump_json()}".encode()).hexdigest()


async def disconnected(request: Request) -> None:
    """Returns when the client goes away (the body was read already, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_attached(service: BrokerService, job_id: str, request: Request) -> None:
    """Wait for a job to end while its requester is connected. When the requester leaves first,
    the job is cancelled after the grace period unless a retry attaches, and this raises a 499
    problem that nobody reads (the handler ends instead of waiting on)."""
    async with service.attached(job_id):
        waiting = asyncio.ensure_future(service.wait(job_id))
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiting, gone):
                t.cancel()
        if not waiting.done() or waiting.cancelled():
            raise client_left(job_id)


async def attached_events(service: BrokerService, job_id: str) -> AsyncIterator[dict[str, Any]]:
    """A job's events for a streaming requester; when it disconnects the stream is closed and
    the job cancelled after the grace period unless a retry attaches."""
    async with service.attached(job_id):
        async for ev in service.events(job_id):
            yield ev


async def client_reads(service: BrokerService, row: JobRow, read: str | None, authorization: str | None) -> bool:
    """Whether the request proves it comes from the job's client (False when it offers no proof;
    a 401/403 problem when it offers a bad one)."""
    if read:
        verify_job_read(read, domain=service.market.domain(), job_id=row.id, client=row.client, now=int(time.time()))
        return True
    if authorization:
        account = await asyncio.to_thread(resolve_api_key, service.ledger, authorization, int(time.time()))
        signed = signed_job(row, service.broker.address)
        signer = recover_authorization(service.market.domain(), signed.authorization, signed.signature.signature)
        if account.client != row.client or account.spender.address != signer:
            raise not_your_job("this API key did not run this job")
        return True
    return False


def job_public(ledger: Ledger, row: JobRow, *, content: bool) -> JobPublic:
    """The job as the API shows it; ``content``: include the request and the answer (its client only)."""
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
        content_withheld=not content,
        request=json.loads(row.request_json) if content else None,
        answer=row.answer if content else None,
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
async def create_job(
    body: JobCreate, service: ServiceDep, request: Request, idempotency_key: IdempotencyHeader = None
) -> Any:
    """Run a paid job under the client's EIP-712 authorization. With `stream: true` the response is
    a server-sent event stream of tokens; otherwise the job is returned when it finishes. A retry
    with the same `Idempotency-Key` and body gets the same job. A client that disconnects before
    the job ends cancels it (nothing is charged)."""
    idem = Idempotency(idempotency_key, body_hash(body, "job")) if idempotency_key else None
    row = await service.submit(body, idempotency=idem)
    if body.stream:
        return sse(attached_events(service, row.id), status_code=201)
    await wait_attached(service, row.id, request)
    if (done := service.finished_row(row.id)) is not None and done.batch_id is None:
        return job_public(service.ledger, done, content=True)  # as recorded at its end: nothing to read
    return await asyncio.to_thread(lambda: job_public(service.ledger, known_job(service, row.id), content=True))


def known_job(service: BrokerService, job_id: str) -> JobRow:
    """The job (a database read: call it from a worker thread or a sync handler)."""
    row = service.ledger.get_job(job_id)
    if row is None:
        raise unknown_job(job_id)
    return row


@router.get("/jobs", response_model=list[JobPublic])
def list_jobs(service: ServiceDep, limit: int = 50) -> list[JobPublic]:
    """Most recent jobs first, without their content (read one job with its client's proof)."""
    return [job_public(service.ledger, r, content=False) for r in service.ledger.recent_jobs(min(max(limit, 1), 500))]


@router.get("/jobs/{job_id}", response_model=JobPublic)
async def get_job(
    job_id: str, service: ServiceDep, x_dlis_job_read: ReadHeader = None, read: ReadQuery = None,
    authorization: AuthHeader = None,
) -> JobPublic:  # fmt: skip
    """Status, route, tokens, cost, receipts and settlement transaction of a job; its request and
    answer too for its client (``X-DLIS-Job-Read`` signature or the job's API key)."""
    row = await asyncio.to_thread(known_job, service, job_id)
    content = await client_reads(service, row, x_dlis_job_read or read, authorization)
    return await asyncio.to_thread(job_public, service.ledger, row, content=content)


@router.get("/jobs/{job_id}/events")
async def job_events(
    job_id: str, service: ServiceDep, x_dlis_job_read: ReadHeader = None, read: ReadQuery = None,
    authorization: AuthHeader = None,
) -> StreamingResponse:  # fmt: skip
    """Server-sent events of a job: every token so far, then live ones until it ends. Token events
    go to the job's client only; others see when it ends."""
    row = await asyncio.to_thread(known_job, service, job_id)
    content = await client_reads(service, row, x_dlis_job_read or read, authorization)
    events = service.events(job_id)
    return sse(events if content else _without_tokens(events))


async def _without_tokens(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    async for ev in events:
        if ev["type"] != "token":
            yield ev
