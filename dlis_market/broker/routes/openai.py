"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions (streaming and not).

Clients authenticate with an API key (``Authorization: Bearer sk-dlis-...``) that maps to a client
account with a standing on-chain spending authorization; the broker signs each job's
authorization with the key's spender and the job is paid and settled like any other.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from dlis_market.broker.apikeys import ApiKeyAccount, resolve_api_key
from dlis_market.broker.auth import signing_deadline
from dlis_market.broker.deps import ServiceDep
from dlis_market.broker.errors import job_failed
from dlis_market.broker.job_types import Idempotency, PricedJob
from dlis_market.broker.routes.jobs import IdempotencyHeader, attached_events, body_hash, wait_attached
from dlis_market.broker.schemas import Authorization, ChatMessage, JobCreate, Policy, Sampling
from dlis_market.broker.service import BrokerService
from dlis_market.chain.job_market import JobAuthorization, sign_authorization

router = APIRouter(prefix="/v1", tags=["openai"])


class _OpenAIIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI parameters are accepted and ignored

    model: str
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    user: str | None = None

    def sampling(self) -> Sampling:
        if self.temperature is None or self.temperature == 0:
            return Sampling(greedy=True)
        return Sampling(greedy=False, temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 64


class ChatCompletionRequest(_OpenAIIn):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class CompletionRequest(_OpenAIIn):
    prompt: str = Field(min_length=1, max_length=200_000)


@dataclass(frozen=True)
class Retry:
    """What marks a request as a retry: an ``Idempotency-Key`` header, or the official openai
    client's ``x-stainless-retry-count`` above 0 (it sends no Idempotency-Key of its own)."""

    key: str | None
    count: int


async def _admit(
    service: BrokerService,
    authorization: str | None,
    prompt: str | None,
    messages: list[ChatMessage] | None,
    body: _OpenAIIn,
    kind: str,
    retry: Retry,
) -> str:
    """Price the job once, sign its authorization with the API key's spender for exactly that
    bound, and admit it on the same route.

    Idempotency: with an ``Idempotency-Key``, a request with that key and body from the same API
    key within the window gets the first one's job. Without one, the key is derived from the API
    key and the body's hash, and only a request the client marks as a retry
    (``x-stainless-retry-count`` > 0) reuses the job: two deliberate identical requests still run
    twice."""
    now = await asyncio.to_thread(service.market.client.timestamp)
    account = await asyncio.to_thread(resolve_api_key, service.ledger, authorization, now)
    digest = body_hash(body, kind)
    idem = Idempotency(
        retry.key or f"request:{digest}", digest, account.key_hash, replay=retry.key is not None or retry.count > 0
    )
    if idem.replay and (prior := await service.admitted_before(idem)) is not None:
        return prior.id
    msgs = [m.model_dump() for m in messages] if messages is not None else None
    lifetime = await asyncio.to_thread(service.max_authorization_lifetime)
    priced = await service.price(body.model, prompt, msgs, body.limit(), Policy(), admit=True)
    # From here a job slot is held: submit releases it whatever happens, so nothing is awaited
    # between pricing and submit.
    try:
        req = _signed_request(service, account, body, priced, now, lifetime, prompt, messages)
    except BaseException:
        service.abandon(priced)
        raise
    row = await service.submit(req, spender=account.spender.address, priced=priced, idempotency=idem)
    return row.id


def _signed_request(
    service: BrokerService,
    account: ApiKeyAccount,
    body: _OpenAIIn,
    priced: PricedJob,
    now: int,
    lifetime: int,
    prompt: str | None,
    messages: list[ChatMessage] | None,
) -> JobCreate:
    """The native job request the API key's spender signs for a priced OpenAI-style request."""
    auth = JobAuthorization(
        client=account.client,
        broker=service.broker.address,
        model_id=bytes.fromhex(priced.served.model_id[2:]),
        max_cost=priced.total,
        nonce=secrets.randbits(255),
        deadline=signing_deadline(now, lifetime),
    )
    sig = sign_authorization(account.spender.key, service.market.domain(), auth)
    return JobCreate(
        model=body.model,
        prompt=prompt,
        messages=messages,
        max_tokens=body.limit(),
        sampling=body.sampling(),
        authorization=Authorization(
            client=account.client, nonce=auth.nonce, max_cost=auth.max_cost, deadline=auth.deadline, signature=sig.hex()
        ),
    )


async def _complete(
    service: BrokerService,
    request: Request,
    body: _OpenAIIn,
    authorization: str | None,
    kind: Literal["chat", "text"],
    retry: Retry,
    prompt: str | None = None,
    messages: list[ChatMessage] | None = None,
) -> Any:
    """Both completion routes: admit, then stream chunks or answer once the job ends. A client
    that disconnects before the end cancels the job (after a grace period a retry can use)."""
    job_id = await _admit(service, authorization, prompt, messages, body, kind, retry)
    created = int(time.time())
    if body.stream:
        return _stream(service, job_id, created, body.model, kind, body.limit())
    await wait_attached(service, job_id, request)
    row = await _result(service, job_id)
    finish = await asyncio.to_thread(_finish_reason, service, job_id, body.model, body.limit())
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": row.answer}
    else:
        choice["text"] = row.answer
    return {
        "id": ("chatcmpl-" if kind == "chat" else "cmpl-") + job_id[2:26],
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": body.model,
        "choices": [choice],
        "usage": _usage(row),
        "dlis": {"job_id": job_id, "cost": str(row.cost), "fee": str(row.fee)},
    }


def _finish_reason(service: BrokerService, job_id: str, model: str, limit: int) -> str:
    row = service.ledger.get_job(job_id)
    if row is None or row.status == "failed":
        return "error"
    ids = json.loads(row.token_ids_json or "[]")
    eos = service.catalog.get(model).eos_token_ids
    return "stop" if (ids and ids[-1] in eos) or len(ids) < limit else "length"


async def _result(service: BrokerService, job_id: str) -> Any:
    await service.wait(job_id)
    row = await asyncio.to_thread(service.ledger.get_job, job_id)
    if row is None or row.status == "failed":
        raise job_failed((row.error if row else None) or "the job failed")
    return row


def _usage(row: Any) -> dict[str, int]:
    return {
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.prompt_tokens + row.completion_tokens,
    }


def _stream(
    service: BrokerService, job_id: str, created: int, model: str, kind: Literal["chat", "text"], limit: int
) -> StreamingResponse:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    cid = ("chatcmpl-" if kind == "chat" else "cmpl-") + job_id[2:26]

    def chunk(text: str | None, finish: str | None, first: bool = False) -> bytes:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {}
            if text and not first:
                delta = {"content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        payload = {"id": cid, "object": obj, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n".encode()

    async def body() -> AsyncIterator[bytes]:
        first = True
        async for ev in attached_events(service, job_id):
            if ev["type"] == "token" and ev["text"]:
                yield chunk(ev["text"], None, first=first)
                first = False
            elif ev["type"] == "error":
                err = {"error": {"message": ev.get("detail") or "job failed", "type": "server_error"}}
                yield f"data: {json.dumps(err)}\n\n".encode()
                return
        yield chunk(None, await asyncio.to_thread(_finish_reason, service, job_id, model, limit))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


AuthHeader = Annotated[str | None, Header(max_length=200)]
RetryCountHeader = Annotated[int, Header(alias="x-stainless-retry-count", ge=0, le=1000)]


@router.get("/models")
async def list_models(service: ServiceDep) -> dict[str, Any]:
    """Models this broker serves (OpenAI list shape)."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "dlis-market"}
            for name in sorted(service.catalog.models)
        ],
    }


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, service: ServiceDep, request: Request, authorization: AuthHeader = None,
    idempotency_key: IdempotencyHeader = None, retry_count: RetryCountHeader = 0,
) -> Any:  # fmt: skip
    """OpenAI chat completion; the prompt is built with the model's own chat template."""
    retry = Retry(idempotency_key, retry_count)
    return await _complete(service, request, body, authorization, "chat", retry, messages=body.messages)


@router.post("/completions")
async def completions(
    body: CompletionRequest, service: ServiceDep, request: Request, authorization: AuthHeader = None,
    idempotency_key: IdempotencyHeader = None, retry_count: RetryCountHeader = 0,
) -> Any:  # fmt: skip
    """OpenAI text completion of a raw prompt."""
    retry = Retry(idempotency_key, retry_count)
    return await _complete(service, request, body, authorization, "text", retry, prompt=body.prompt)
