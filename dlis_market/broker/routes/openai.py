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

Why one module of this size: admitting a request's choices, following their token streams (stop
strings, log probabilities) and answering whole or streamed share each choice's live state
(:class:`Choice`); what a client may send is :mod:`dlis_market.broker.openai_requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from dlis_market.broker.apikeys import ApiKeyAccount, resolve_api_key
from dlis_market.broker.auth import signing_deadline
from dlis_market.broker.catalog import ServedModel
from dlis_market.broker.deps import ServiceDep
from dlis_market.broker.detokenize import StopMatcher
from dlis_market.broker.errors import InvalidRequest, client_left, job_failed
from dlis_market.broker.job_types import Idempotency, PricedJob
from dlis_market.broker.openai_requests import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
)
from dlis_market.broker.routes.jobs import IdempotencyHeader, _disconnected, body_hash
from dlis_market.broker.schemas import Authorization, ChatMessage, JobCreate, Policy, Sampling
from dlis_market.broker.service import BrokerService
from dlis_market.chain.job_market import JobAuthorization, sign_authorization
from dlis_market.inference.manifest import MANIFEST_NAME, sha256_file

router = APIRouter(prefix="/v1", tags=["openai"])


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


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, char -> byte (the inverse of its ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class TokenTexts:
    """Token ids as OpenAI's logprob entries show them: the token's text and its raw bytes (a
    byte-level BPE token that is part of a character has its own bytes; its text then holds the
    replacement character, as OpenAI's)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def of(self, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is None:
            raw: bytes | None = None
            if self.byte_level:
                piece = str(self.tok.convert_ids_to_tokens(token))
                table = _byte_decoder()
                raw = bytes(table[c] for c in piece) if all(c in table for c in piece) else None
            text = raw.decode("utf-8", errors="replace") if raw is not None else str(self.tok.decode([token]))
            hit = self._cache[token] = (text, list(raw if raw is not None else text.encode()))
        return hit


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log probabilities as the job's token event carried them, and where
    its text starts in the choice's text (completions' ``text_offset``)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int


@dataclass
class Choice:
    """One choice of the answer: its job and what was read of it so far."""

    index: int
    job_id: str
    echo: str = ""  # the prompt, for completions with ``echo``
    matcher: StopMatcher = field(default_factory=StopMatcher)
    text: str = ""  # streamed so far
    answer: str = ""  # the whole text, once the job ended
    finish: str | None = None
    error: str | None = None
    row: Any = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # every token's, when asked
    pending: list[TokenLogprobs] = field(default_factory=list)  # not yet sent with a chunk
    read: int = 0  # characters of the job's text read so far (before stop strings are cut)

    def take(self) -> list[TokenLogprobs]:
        out, self.pending = self.pending, []
        return out


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
    priced = await service.price(body.model, job.prompt, msgs, body.limit(), Policy(), admit=True)
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
        authorization=Authorization(
            client=account.client, nonce=auth.nonce, max_cost=auth.max_cost, deadline=auth.deadline, signature=sig.hex()
        ),
    )


async def _admit_all(
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
    choice.finish = "stop" if stopped else _finish_reason(row, eos, limit)


def _finish_reason(row: Any, eos: tuple[int, ...], limit: int) -> str:
    ids = json.loads(row.token_ids_json or "[]")
    return "stop" if (ids and ids[-1] in eos) or len(ids) < limit else "length"


def _usage(choices: list[Choice]) -> dict[str, int]:
    """Tokens of every job of the answer (each was run and is paid): what the client is charged for."""
    prompt = sum(c.row.prompt_tokens for c in choices if c.row is not None)
    completion = sum(c.row.completion_tokens for c in choices if c.row is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@functools.lru_cache(maxsize=64)
def _fingerprint(manifest: Path, mtime_ns: int) -> str:
    """The served weights, as OpenAI's ``system_fingerprint``: changes when the shards do."""
    return "fp_" + sha256_file(manifest)[:12]


def system_fingerprint(served: ServedModel) -> str:
    path = served.shard_dir / MANIFEST_NAME
    return _fingerprint(path, path.stat().st_mtime_ns)


@dataclass(frozen=True)
class Answer:
    """What the response of a request is made of, whatever its kind."""

    kind: Literal["chat", "text"]
    model: str
    fingerprint: str
    created: int
    limit: int
    eos: tuple[int, ...]
    texts: TokenTexts | None = None  # set when the request asked for log probabilities

    def logprobs(self, entries: list[TokenLogprobs]) -> dict[str, Any] | None:
        """OpenAI's ``logprobs`` object of a choice (or a chunk) for these tokens; None when not asked."""
        texts = self.texts
        if texts is None:
            return None
        if self.kind == "chat":

            def one(token: int, logprob: float) -> dict[str, Any]:
                text, raw = texts.of(token)
                return {"token": text, "logprob": logprob, "bytes": raw}

            content = [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries]
            return {"content": content, "refusal": None}
        # completions: the top tokens and the sampled one (as vLLM), text -> log probability
        tops = []
        for e in entries:
            top = {texts.of(t)[0]: v for t, v in e.top}
            top.setdefault(texts.of(e.token)[0], e.logprob)
            tops.append(top)
        return {
            "tokens": [texts.of(e.token)[0] for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops,
            "text_offset": [e.offset for e in entries],
        }

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def id_of(self, job_id: str) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + job_id[2:26]

    def head(self, choices: list[Choice]) -> dict[str, Any]:
        return {"id": self.id_of(choices[0].job_id), "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}  # fmt: skip


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
    job_ids = await _admit_all(service, authorization, body, kind, retry, jobs)
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
        "usage": _usage(choices),
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
    gone = asyncio.ensure_future(_disconnected(request))
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
            payload["usage"] = _usage(choices) if choice is None else None
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
    """Models this broker serves (OpenAI list shape)."""
    return {"object": "list", "data": [_model_card(service.catalog.models[n]) for n in sorted(service.catalog.models)]}


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
