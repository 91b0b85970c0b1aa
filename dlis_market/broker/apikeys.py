"""API keys for OpenAI-style clients, backed by an on-chain standing spending authorization.

Creating a key makes a fresh spender key, which the client authorizes on JobMarket with
``setSpender(spender, 0, cap, expiry)``: the chain itself enforces the cap and the expiry. The
broker stores only sha256(api key) and the spender key encrypted *with the API key*, so the
database alone cannot spend anything; each request decrypts the spender key and signs that job's
authorization on the client's behalf.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass

from eth_account import Account
from eth_account.signers.local import LocalAccount

from dlis_market.broker.ledger import ApiKeyRow, Ledger
from dlis_market.broker.problems import ProblemError
from dlis_market.chain.job_market import JobMarket

PREFIX = "sk-dlis-"


def key_hash(api_key: str) -> str:
    return "0x" + hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeyGrant:
    api_key: str
    client: str
    spender: str
    cap: int
    expires_at: int


def create_api_key(ledger: Ledger, market: JobMarket, client: LocalAccount, cap: int, expires_at: int) -> ApiKeyGrant:
    """Authorize a new spender on chain for ``client`` and record the key. Returns the secret once."""
    api_key = PREFIX + secrets.token_hex(24)
    spender: LocalAccount = Account.create()
    market.set_spender(client, spender.address, cap, expires_at)
    # The API key has 192 bits of entropy, so a cheap KDF is enough to encrypt with it.
    encrypted = Account.encrypt(spender.key, api_key, kdf="pbkdf2", iterations=1000)
    ledger.add_api_key(
        ApiKeyRow(
            key_hash=key_hash(api_key),
            client=client.address,
            cap=cap,
            expires_at=expires_at,
            signer_key=json.dumps(encrypted),
        )
    )
    return ApiKeyGrant(api_key, client.address, spender.address, cap, expires_at)


@dataclass(frozen=True)
class ApiKeyAccount:
    client: str
    spender: LocalAccount
    expires_at: int
    key_hash: str


def resolve_api_key(ledger: Ledger, authorization: str | None, now: int) -> ApiKeyAccount:
    """``Authorization: Bearer sk-dlis-...`` -> the client and its spender key, or a 401 problem."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise ProblemError(
            401,
            "missing-api-key",
            "Missing API key",
            "send `Authorization: Bearer sk-dlis-...` (create one with `dlis broker api-key`)",
        )
    api_key = authorization.split(" ", 1)[1].strip()
    row = ledger.get_api_key(key_hash(api_key))
    if row is None:
        raise ProblemError(401, "bad-api-key", "Unknown API key", "this API key is not known to the broker")
    if row.expires_at < now:
        raise ProblemError(
            401, "expired-api-key", "Expired API key", f"the API key expired at {row.expires_at} (now {now})"
        )
    key = Account.decrypt(json.loads(row.signer_key), api_key)
    return ApiKeyAccount(row.client, Account.from_key(key), row.expires_at, row.key_hash)
