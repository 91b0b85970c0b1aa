"""The broker's FastAPI application. Every refusal leaves it as RFC 9457 problem JSON, mapped in
one place (:func:`install_problem_handlers`): the broker's domain errors, FastAPI's own 404/405 and
request validation (422; 400 on the OpenAI routes, as OpenAI answers), and, as a 500 problem, any
broker error nobody mapped. Every problem also carries OpenAI's ``error`` object, which OpenAI
clients read."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dlis_market.broker.errors import Refusal, request_too_large
from dlis_market.broker.metrics import broker_metrics_router
from dlis_market.broker.problems import openai_error, openai_status, problem_body, problem_headers, status_of
from dlis_market.broker.routes import api_keys, dashboard, jobs, openai
from dlis_market.broker.service import BrokerService
from dlis_market.errors import BrokerError
from dlis_market.http_metrics import HttpMetrics
from dlis_market.types import PROBLEM_TYPE_BASE
from dlis_market.web_docs import serve_docs

log = logging.getLogger(__name__)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with a 413 problem before the app reads them: at
    once from Content-Length (the server reads exactly that many bytes), else while buffering a
    chunked body, which then is replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            size = int(length) if length.isdigit() else None
            if size is None or size > self.max_bytes:
                await self._refuse(scope, send, request_too_large(size, self.max_bytes))
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._refuse(scope, send, request_too_large(None, self.max_bytes))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, problem: Refusal) -> None:
        payload = json.dumps(problem_body(problem, str(scope.get("path", "")))).encode()
        headers: list[Any] = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status_of(problem), "headers": headers})
        await send({"type": "http.response.body", "body": payload})


PROBLEM_JSON = "application/problem+json"


def _problem(instance: str, status: int, slug: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": PROBLEM_TYPE_BASE + slug, "title": title, "status": status, "detail": detail, "instance": instance}
    return JSONResponse({**body, **extra}, status_code=status, media_type=PROBLEM_JSON)


def install_problem_handlers(app: FastAPI) -> None:
    """The one mapping from what went wrong to the HTTP answer."""

    @app.exception_handler(Refusal)
    async def _refusal(request: Request, exc: Refusal) -> JSONResponse:
        status = openai_status(request.url.path, status_of(exc))
        return JSONResponse(
            problem_body(exc, request.url.path, status),
            status_code=status,
            media_type=PROBLEM_JSON,
            headers=problem_headers(exc),
        )

    @app.exception_handler(BrokerError)
    async def _unmapped(request: Request, exc: BrokerError) -> JSONResponse:
        # A broker error no refusal family covers is the broker's fault, said as a problem.
        log.error("unmapped broker error on %s: %s", request.url.path, exc)
        error = openai_error(str(exc), 500, "internal")
        return _problem(request.url.path, 500, "internal", "Internal broker error", str(exc), error=error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, f"http-{exc.status_code}")
        detail = str(exc.detail)
        if request.url.path.startswith("/v1/") and exc.status_code in (404, 405):  # OpenAI clients read "error"
            detail = (
                f"{request.method} {request.url.path}: {detail.lower()}; see /docs for the routes this broker serves"
            )
        # Every problem carries OpenAI's error object too, so OpenAI clients show the detail.
        error = openai_error(detail, exc.status_code, slug)
        res = _problem(request.url.path, exc.status_code, slug, HTTPStatus(exc.status_code).phrase, detail, error=error)
        res.headers.update(exc.headers or {})
        return res

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
        status = openai_status(request.url.path, 422)  # 400 on the OpenAI routes, as OpenAI answers
        error = openai_error(_openai_message(errors), status, "invalid-request", _param(errors))
        path = request.url.path
        return _problem(path, status, "invalid-request", "Invalid request", detail, errors=errors, error=error)


def _param(errors: list[dict[str, Any]]) -> str | None:
    """OpenAI's ``param``: the body field of the first error."""
    loc = [p for p in errors[0]["loc"] if p != "body"] if errors else []
    return ".".join(loc) or None


def _openai_message(errors: list[dict[str, Any]]) -> str:
    """Each error as ``field: what is wrong`` (pydantic's "Value error, " prefix dropped)."""
    out = []
    for e in errors:
        where = ".".join(p for p in e["loc"] if p != "body") or "body"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unrecognized request argument; leave it out (README, 'OpenAI compatibility', lists what is taken)"
        out.append(f"{where}: {msg}")
    return "; ".join(out)


def create_app(service: BrokerService, settle_in_background: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.recover()  # jobs a previous process left unfinished (settled for what was served)
        task = asyncio.create_task(service.settle_loop()) if settle_in_background else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            await service.close()

    app = FastAPI(
        title="dlis_market broker",
        version="1",
        description="Paid LLM inference over a pipeline of staked peers, settled on chain.",
        lifespan=lifespan,
        docs_url=None,  # served by serve_docs: the defaults load their assets from public CDNs
        redoc_url=None,
    )
    serve_docs(app)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.settings.broker.max_request_bytes)
    app.add_middleware(HttpMetrics, registry=service.metrics.registry, prefix="dlis_broker")
    install_problem_handlers(app)
    app.include_router(jobs.router)
    app.include_router(api_keys.router)
    app.include_router(openai.router)
    app.include_router(dashboard.router)
    app.include_router(broker_metrics_router(service.metrics, service.ledger))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
