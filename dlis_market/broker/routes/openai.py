"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions (streaming and not).

Clients authenticate with an API key (``Authorization: Bearer sk-dlis-...``) that maps to a client
account with a standing on-chain spending authorization; the broker signs each job's
authorization with the key's spender and the job is paid and settled like any other.

Every parameter is either implemented or refused with a 400 in OpenAI's error shape (README,
"OpenAI compatibility"): nothing is accepted and ignored. ``n`` > 1 and a list of prompts run one
paid job per choice; ``stop`` strings are cut here, from the streamed text, and a job that hit one
is ended at once (settled for the tokens its stages served).

Penalties, ``logit_bias`` and ``logprobs`` are applied by the last stage's sampler
(``inference.sampling``). Log probabilities are those of the model's raw distribution: the
log-softmax of the logits before logit bias, penalties, temperature and top-p, as vLLM's default
(``logprobs_mode="raw_logprobs"``). They travel with each token and are returned in OpenAI's
shapes, with the tokens up to the one that completed a stop string.

Here: following each choice's token stream (stop strings, log probabilities) and answering whole
or streamed. What a client may send is :mod:`dlis_market.broker.openai_requests`; admitting a
request's jobs :mod:`.openai_admission`; each choice's state and the answer's shapes
:mod:`.openai_answers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from dlis_market.broker.catalog import ServedModel
from dlis_market.broker.deps import ServiceDep
from dlis_market.broker.detokenize import StopMatcher
from dlis_market.broker.errors import InvalidRequest, client_left, job_failed
from dlis_market.broker.openai_requests import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
)
from dlis_market.broker.routes.jobs import IdempotencyHeader, disconnected
from dlis_market.broker.routes.openai_admission import JobInput, Retry, admit_all
from dlis_market.broker.routes.openai_answers import (
    Answer,
    Choice,
    TokenLogprobs,
    TokenTexts,
    finish_reason,
    system_fingerprint,
    usage_of,
)
from dlis_market.broker.schemas import ChatMessage
from dlis_market.broker.service import BrokerService
from dlis_market.inference.manifest import MANIFEST_NAME

router = APIRouter(prefix="/v1", tags=["openai"])

Emit = Callable[[Choice, str, list[TokenLogprobs]], None]


async def _follow(service: BrokerService, choice: Choice, limit: int, eos: tuple[int, ...], emit: Emit) -> None:
    """Read one choice's job to its end: text pieces go to ``emit`` cut at the first stop string,
    with the log probabilities of the tokens read since the last piece (when the job has them);
    a job that hit one is ended at once. Sets ``finish`` (or ``error``) and the ledger ``row``."""
    async with service.attached(choice.job_id):
        events = service.events(choice.job_id)
        try:
            async for ev in events:
                if ev["type"] == "token" and (lp := ev.get("logprob")) is not None:
                    top = [(int(t), float(v)) for t, v in lp["top"]]
                    entry = TokenLogprobs(
                        int(ev["token_id"]), float(lp["logprob"]), top, len(choice.echo) + choice.read
                    )
                    choice.logprobs.append(entry)
                    choice.pending.append(entry)
                if ev["type"] == "token" and ev["text"]:
                    choice.read += len(ev["text"])
                    piece = choice.matcher.push(ev["text"])
                    if piece:
                        choice.text += piece
                        emit(choice, piece, choice.take())
                    if choice.matcher.stopped:
                        break
                elif ev["type"] == "error":
                    choice.error = ev.get("detail") or "the job failed"
                    return
        finally:  # stop reading now (at a stop string the generator is left mid-way)
            if isinstance(events, AsyncGenerator):
                await events.aclose()
    if choice.matcher.stopped:
        service.end_early(choice.job_id, "a stop string was generated")
        await service.wait(choice.job_id)  # settled (for the tokens served) before usage is read
    elif tail := choice.matcher.flush():
        choice.text += tail
        emit(choice, tail, choice.take())
    row = await asyncio.to_thread(service.ledger.get_job, choice.job_id)
    if row is None or row.status == "failed":
        choice.error = (row.error if row else None) or "the job failed"
        return
    choice.row = row
    # The recorded answer cut at the stop: the same text as the pieces, and the whole of it even
    # when this request attached to the job after its token events were dropped (a late retry).
    choice.answer, stopped = StopMatcher(choice.matcher.stops).cut(row.answer or "")
    choice.finish = "stop" if stopped else finish_reason(row, eos, limit)


def _check_bias(body: OpenAIRequest, served: ServedModel) -> None:
    """A logit_bias token id must be one of the model's (a bias on another would do nothing)."""
    bias = body.bias()
    vocab = int(served.manifest.config.get("vocab_size") or len(served.tokenizer))
    if bias and max(bias) >= vocab:
        raise InvalidRequest(
            f"logit_bias names token {max(bias)}, outside the {vocab} tokens of {served.name}; "
            "use ids of its tokenizer",
            kind="invalid-request",
            param="logit_bias",
        )


async def _complete(
    service: BrokerService,
    request: Request,
    body: OpenAIRequest,
    authorization: str | None,
    kind: Literal["chat", "text"],
    retry: Retry,
    inputs: list[tuple[str | None, list[ChatMessage] | None]],
    echo: bool = False,
) -> Any:
    """Both completion routes: admit one job per choice, then stream chunks or answer once every
    job ends. A client that disconnects before the end cancels the jobs (after a grace period a
    retry can use)."""
    served = service.catalog.get(body.model)
    _check_bias(body, served)
    pairs = [(prompt, messages) for prompt, messages in inputs for _ in range(body.n)]
    seeds = body.seeds(len(pairs))
    jobs = [JobInput(p, m, body.sampling(seed)) for (p, m), seed in zip(pairs, seeds, strict=True)]
    job_ids = await admit_all(service, authorization, body, kind, retry, jobs)
    stops = body.stop if isinstance(body.stop, list) else []
    choices = [
        Choice(i, job_id, echo=(job.prompt or "") if echo else "", matcher=StopMatcher(stops))
        for i, (job_id, job) in enumerate(zip(job_ids, jobs, strict=True))
    ]
    answer = Answer(
        kind, body.model, system_fingerprint(served), int(time.time()), body.limit(), served.eos_token_ids,
        TokenTexts(served.tokenizer) if body.wanted_logprobs() is not None else None,
    )  # fmt: skip
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return _stream(service, answer, choices, usage)
    await _wait_all(service, request, answer, choices)
    failed = [c.error for c in choices if c.error is not None]
    if failed:
        raise job_failed(failed[0])
    out = []
    for c in choices:
        text = c.echo + c.answer
        if answer.texts is not None and c.row.completion_tokens and not c.logprobs:
            raise job_failed(
                f"the log probabilities of job {c.job_id} are no longer held (a retry attached after its token "
                "events were dropped); send the request again without an Idempotency-Key"
            )
        item: dict[str, Any] = {"index": c.index, "finish_reason": c.finish, "logprobs": answer.logprobs(c.logprobs)}
        if kind == "chat":
            item["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            item["text"] = text
        out.append(item)
    rows = [c.row for c in choices]
    return {
        **answer.head(choices),
        "object": answer.object,
        "choices": out,
        "usage": usage_of(choices),
        "dlis": {
            "job_id": choices[0].job_id,
            "cost": str(sum(r.cost or 0 for r in rows)),
            "fee": str(sum(r.fee or 0 for r in rows)),
            "jobs": [{"job_id": c.job_id, "cost": str(c.row.cost), "fee": str(c.row.fee)} for c in choices],
        },
    }


async def _wait_all(service: BrokerService, request: Request, answer: Answer, choices: list[Choice]) -> None:
    """Follow every job to its end while the requester is connected; when it leaves first, its
    jobs are left (cancelled after the grace period unless a retry attaches) and this raises a
    499 problem that nobody reads."""
    tasks = [
        asyncio.create_task(_follow(service, c, answer.limit, answer.eos, lambda _c, _p, _l: None)) for c in choices
    ]
    everything = asyncio.gather(*tasks)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        waiting: set[asyncio.Future[Any]] = {everything, gone}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        left = not everything.done()
        if left:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await everything
    if left:
        raise client_left(choices[0].job_id)
    everything.result()  # a failure of the reading itself


def _stream(service: BrokerService, answer: Answer, choices: list[Choice], include_usage: bool) -> StreamingResponse:
    head = {**answer.head(choices), "object": "chat.completion.chunk" if answer.kind == "chat" else "text_completion"}

    def chunk(
        choice: Choice | None, text: str | None, finish: str | None = None, first: bool = False,
        entries: list[TokenLogprobs] | None = None,
    ) -> bytes:  # fmt: skip
        payload: dict[str, Any] = {**head, "choices": []}
        if choice is not None:
            lps = answer.logprobs(entries) if entries else None
            item: dict[str, Any] = {"index": choice.index, "finish_reason": finish, "logprobs": lps}
            if answer.kind == "chat":
                item["delta"] = {"role": "assistant", "content": text or ""} if first else {}
                if text and not first:
                    item["delta"] = {"content": text}
            else:
                item["text"] = text or ""
            payload["choices"] = [item]
        if include_usage:  # null on every chunk but the last, as OpenAI sends it
            payload["usage"] = usage_of(choices) if choice is None else None
        return f"data: {json.dumps(payload)}\n\n".encode()

    async def body() -> AsyncIterator[bytes]:
        # (choice, text, its tokens' log probabilities); text None: the job ended
        queue: asyncio.Queue[tuple[Choice, str | None, list[TokenLogprobs]]] = asyncio.Queue()

        async def follow(c: Choice) -> None:
            try:
                await _follow(service, c, answer.limit, answer.eos, lambda ch, p, lps: queue.put_nowait((ch, p, lps)))
            finally:
                queue.put_nowait((c, None, []))

        for c in choices:  # chat: the role first, as OpenAI; completions: the echoed prompt
            if answer.kind == "chat" or c.echo:
                yield chunk(c, c.echo or None, first=True)
        tasks = [asyncio.create_task(follow(c)) for c in choices]
        try:
            running = len(tasks)
            while running:
                c, piece, entries = await queue.get()
                if piece is not None:
                    yield chunk(c, piece, entries=entries)
                    continue
                running -= 1
                if c.error is not None or c.finish is None:  # failed (or its reading did)
                    why = c.error or f"reading job {c.job_id} failed; its record is at /v1/jobs/{c.job_id}"
                    err = {"error": {"message": why, "type": "server_error", "param": None, "code": "job_failed"}}
                    yield f"data: {json.dumps(err)}\n\n".encode()
                    return
                yield chunk(c, None, c.finish, entries=c.take())  # tokens whose text a stop string cut
            if include_usage:
                yield chunk(None, None)
            yield b"data: [DONE]\n\n"
        finally:  # the client left (or a job failed): the others are left to the grace period
            for t in tasks:
                t.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


AuthHeader = Annotated[str | None, Header(max_length=200)]
RetryCountHeader = Annotated[int, Header(alias="x-stainless-retry-count", ge=0, le=1000)]


def _model_card(served: ServedModel) -> dict[str, Any]:
    # created: when the served shards were made (their manifest's time), as a Unix time
    created = int((served.shard_dir / MANIFEST_NAME).stat().st_mtime)
    return {"id": served.name, "object": "model", "created": created, "owned_by": "dlis-market"}


@router.get("/models")
async def list_models(service: ServiceDep) -> dict[str, Any]:
    """Models this broker serves, and the adapters over them it knows of (OpenAI list shape)."""
    catalog = service.catalog
    served = [catalog.models[n] for n in sorted(catalog.models)]
    adapters = [a for n in catalog.adapter_names if (a := catalog.find(n)) is not None]
    return {"object": "list", "data": [_model_card(m) for m in served + adapters]}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, service: ServiceDep) -> dict[str, Any]:
    """One served model (404 in OpenAI's error shape when it is not served here)."""
    return _model_card(service.catalog.get(model_id))


async def _check_roles(served: ServedModel, messages: list[ChatMessage]) -> None:
    """A role other than system/user/assistant must be one the model's chat template renders."""
    if all(m.role in ("system", "user", "assistant") for m in messages):
        return
    tok = served.tokenizer
    if not getattr(tok, "chat_template", None):
        return  # the plain "role: text" rendering takes any role
    dumped = [m.model_dump() for m in messages]
    try:
        await asyncio.to_thread(tok.apply_chat_template, dumped, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises its own errors (raise_exception in the template)
        raise InvalidRequest(
            f"the chat template of {served.name} cannot render these messages ({exc}); send the tool results "
            "as a user message",
            kind="unsupported-role",
            param="messages",
        ) from exc


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, service: ServiceDep, request: Request, authorization: AuthHeader = None,
    idempotency_key: IdempotencyHeader = None, retry_count: RetryCountHeader = 0,
) -> Any:  # fmt: skip
    """OpenAI chat completion; the prompt is built with the model's own chat template."""
    messages = [m.native() for m in body.messages]
    await _check_roles(service.catalog.get(body.model), messages)
    retry = Retry(idempotency_key, retry_count)
    return await _complete(service, request, body, authorization, "chat", retry, [(None, messages)])


@router.post("/completions")
async def completions(
    body: CompletionRequest, service: ServiceDep, request: Request, authorization: AuthHeader = None,
    idempotency_key: IdempotencyHeader = None, retry_count: RetryCountHeader = 0,
) -> Any:  # fmt: skip
    """OpenAI text completion of a raw prompt (or of each prompt of a list)."""
    if len(body.prompts()) * body.n > MAX_CHOICES:
        raise InvalidRequest(
            f"{len(body.prompts())} prompts x n={body.n} would start {len(body.prompts()) * body.n} paid jobs, over "
            f"the {MAX_CHOICES} one request may start; split the request",
            kind="too-many-choices",
            param="prompt",
        )
    retry = Retry(idempotency_key, retry_count)
    inputs: list[tuple[str | None, list[ChatMessage] | None]] = [(p, None) for p in body.prompts()]
    return await _complete(service, request, body, authorization, "text", retry, inputs, echo=body.echo)
