"""FastAPI dependency aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from dlis_market.broker.service import BrokerService


async def get_service(request: Request) -> BrokerService:
    # async: FastAPI runs a plain ``def`` dependency in its thread pool, one thread hop per request
    service: BrokerService = request.app.state.service
    return service


ServiceDep = Annotated[BrokerService, Depends(get_service)]
