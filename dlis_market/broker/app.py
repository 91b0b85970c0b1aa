"""The broker's FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dlis_market.broker.metrics import broker_metrics_router
from dlis_market.broker.problems import ProblemError, install_handlers, request_too_large
from dlis_market.broker.routes import dashboard, jobs, openai
from dlis_market.broker.service import BrokerService


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
    async def _refuse(scope: Scope, send: Send, problem: ProblemError) -> None:
        payload = json.dumps(problem.body(str(scope.get("path", "")))).encode()
        headers: list[Any] = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": problem.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def create_app(service: BrokerService, settle_in_background: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(service.recover)  # jobs a previous process left unfinished
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
    )
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.settings.broker.max_request_bytes)
    install_handlers(app)
    app.include_router(jobs.router)
    app.include_router(openai.router)
    app.include_router(dashboard.router)
    app.include_router(broker_metrics_router(service.metrics, service.ledger))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
