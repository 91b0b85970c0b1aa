"""The broker's FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from dlis_market.broker.metrics import broker_metrics_router
from dlis_market.broker.problems import install_handlers
from dlis_market.broker.routes import dashboard, jobs, openai
from dlis_market.broker.service import BrokerService


def create_app(service: BrokerService, settle_in_background: bool = True) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
    install_handlers(app)
    app.include_router(jobs.router)
    app.include_router(openai.router)
    app.include_router(dashboard.router)
    app.include_router(broker_metrics_router(service.metrics, service.ledger))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
