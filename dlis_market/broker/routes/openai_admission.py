"""Admission of an OpenAI-style request's jobs: one paid job per choice, each priced once and
authorized by the API key's spender for exactly that bound, with the request's idempotency rules.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

from dlis_market.broker.apikeys import ApiKeyAccount, resolve_api_key
from dlis_market.broker.auth import signing_deadline
from dlis_market.broker.job_types import Idempotency, PricedJob
from dlis_market.broker.openai_requests import OpenAIRequest
from dlis_market.broker.routes.jobs import body_hash
from dlis_market.broker.schemas import Authorization, ChatMessage, JobCreate, Policy, Sampling
from dlis_market.broker.service import BrokerService
from dlis_market.chain.job_market import JobAuthorization, sign_authorization


@dataclass(frozen=True)
class Retry:
    """What marks a request as a retry: an ``Idempotency-Key`` header, or the official openai
    client's ``x-stainless-retry-count`` above 0 (it sends no Idempotency-Key of its own)."""

    key: str | None
    count: int


@dataclass(frozen=True)
class JobInput:
    """One job of a request: its prompt (or messages) and sampling."""

    prompt: str | None
    messages: list[ChatMessage] | None
    sampling: Sampling


async def _admit(
    service: BrokerService,
    authorization: str | None,
    job: JobInput,
    body: OpenAIRequest,
    kind: str,
    retry: Retry,
    part: int,
) -> str:
    """Price one job once, sign its authorization with the API key's spender for exactly that
    bound, and admit it on the same route.

    Idempotency: with an ``Idempotency-Key``, a request with that key and body from the same API
    key within the window gets the first one's jobs. Without one, the key is derived from the API
    key and the body's hash, and only a request the client marks as a retry
    (``x-stainless-retry-count`` > 0) reuses the jobs: two deliberate identical requests still run
    twice. ``part``: the job's place among the request's jobs (``n`` x prompts), part of its key."""
    now = await asyncio.to_thread(service.market.client.timestamp)
    account = await asyncio.to_thread(resolve_api_key, service.ledger, authorization, now)
    digest = body_hash(body, kind)
    key = retry.key or f"request:{digest}"
    idem = Idempotency(
        key if part == 0 else f"{key}#{part}", digest, account.key_hash, replay=retry.key is not None or retry.count > 0
    )
    if idem.replay and (prior := await service.admitted_before(idem)) is not None:
        return prior.id
    msgs = [m.model_dump() for m in job.messages] if job.messages is not None else None
    lifetime = await asyncio.to_thread(service.max_authorization_lifetime)
    priced = await service.price(body.model, job.prompt, msgs, body.limit(), Policy(privacy=body.privacy), admit=True)
    # From here a job slot is held: submit releases it whatever happens, so nothing is awaited
    # between pricing and submit.
    try:
        req = _signed_request(service, account, body, job, priced, now, lifetime)
    except BaseException:
        service.abandon(priced)
        raise
    row = await service.submit(req, spender=account.spender.address, priced=priced, idempotency=idem)
    return row.id


def _signed_request(
    service: BrokerService,
    account: ApiKeyAccount,
    body: OpenAIRequest,
    job: JobInput,
    priced: PricedJob,
    now: int,
    lifetime: int,
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
        prompt=job.prompt,
        messages=job.messages,
        max_tokens=body.limit(),
        sampling=job.sampling,
        policy=Policy(privacy=body.privacy),
        authorization=Authorization(
            client=account.client, nonce=auth.nonce, max_cost=auth.max_cost, deadline=auth.deadline, signature=sig.hex()
        ),
    )


async def admit_all(
    service: BrokerService,
    authorization: str | None,
    body: OpenAIRequest,
    kind: str,
    retry: Retry,
    jobs: list[JobInput],
) -> list[str]:
    """Admit every job of a request, in order; when one is refused, the ones already admitted are
    ended (they cost what their stages served by then) and the refusal is raised."""
    ids: list[str] = []
    try:
        for part, job in enumerate(jobs):
            ids.append(await _admit(service, authorization, job, body, kind, retry, part))
    except BaseException:
        for job_id in ids:
            service.end_early(job_id, "another choice of the same request was refused")
        raise
    return ids
