"""``POST /v1/api-keys``: a key for OpenAI-style clients, issued to whoever proves the account.

The client signs an EIP-712 ``ApiKeyRequest``; the answer holds the API key (once) and the
spender address the client must then authorize on chain (see :mod:`dlis_market.broker.apikeys`).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from dlis_market.broker.apikeys import MAX_CAP, MAX_REQUEST_TTL_S, ApiKeyRequest, issue_api_key
from dlis_market.broker.deps import ServiceDep
from dlis_market.broker.schemas import ApiKeyCreate, ApiKeyPublic, ApiKeyTerms

router = APIRouter(prefix="/v1", tags=["api keys"])


@router.get("/api-keys/terms", response_model=ApiKeyTerms)
async def api_key_terms(service: ServiceDep) -> ApiKeyTerms:
    """What a client needs to sign an ``ApiKeyRequest`` for this broker: its address and the
    EIP-712 domain (JobMarket on this chain), and the bounds a request must keep."""
    domain = service.market.domain()
    return ApiKeyTerms(
        broker=service.broker.address, chain_id=domain.chain_id, job_market=domain.verifying_contract,
        max_request_ttl_s=MAX_REQUEST_TTL_S, max_cap=MAX_CAP,
    )  # fmt: skip


@router.post("/api-keys", status_code=201, response_model=ApiKeyPublic)
async def create_api_key(body: ApiKeyCreate, service: ServiceDep) -> ApiKeyPublic:
    """Issue an API key to a client that signed an ``ApiKeyRequest`` for this broker. The key
    spends nothing until the client sends ``JobMarket.setSpender(spender, 0, cap, expires_at)``."""
    req = ApiKeyRequest(body.client, body.broker, body.cap, body.expires_at, body.nonce, body.deadline)
    market = service.market
    now = await asyncio.to_thread(market.client.timestamp)
    escrow, _withdrawal, _read_at = await service.chain.escrow(req.client, service.broker.address)
    grant = await asyncio.to_thread(
        issue_api_key, service.ledger, market.domain(), service.broker.address, req,
        bytes.fromhex(body.signature[2:]), now, escrow,
    )  # fmt: skip
    return ApiKeyPublic(
        api_key=grant.api_key, client=grant.client, spender=grant.spender, cap=grant.cap,
        expires_at=grant.expires_at, job_market=market.address,
    )  # fmt: skip
