"""FastAPI dependency aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from dlis_market.broker.service import BrokerService


def get_service(request: Request) -> BrokerService:
    service: BrokerService = request.app.state.service
    return service


ServiceDep = Annotated[BrokerService, Depends(get_service)]
