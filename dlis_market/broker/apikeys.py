"""API keys for OpenAI-style clients, backed by an on-chain standing spending authorization.

A client asks the broker for a key over HTTP (``POST /v1/api-keys``) with an EIP-712
``ApiKeyRequest`` its account signed (so it works from any machine). The broker makes a fresh
spender key and answers with the API key and the spender's address; the client then authorizes
that spender on JobMarket with ``setSpender(spender, 0, cap, expiry)``, so the chain itself
enforces the cap and the expiry. Until it does, the key is refused at admission. The broker
stores only sha256(api key) and the spender key encrypted *with the API key*, so the database
alone cannot spend anything; each request decrypts the spender key and signs that job's
authorization on the client's behalf.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from dlis_market.broker.errors import Conflict, InvalidRequest, Overloaded, PaymentRefused, Unauthenticated
from dlis_market.broker.ledger import ApiKeyRow, Ledger
from dlis_market.broker.problems import ProblemError
from dlis_market.chain.job_market import JobMarket
from dlis_market.chain.typed_data import Domain, recover_typed, sign_typed, typed_digest

PREFIX = "sk-dlis-"
MAX_REQUEST_TTL_S = 600  # a signed request must be sent within this (its deadline no further ahead)
MAX_CAP = 2**128 - 1  # JobMarket.setSpender takes the cap as a uint128
MAX_LIVE_KEYS = 64  # unexpired keys per client at one broker


def key_hash(api_key: str) -> str:
    return "0x" + hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeyRequest:
    """What a client signs to get a key: for ``broker``, spending up to ``cap`` until ``expires_at``
    (the values it will authorize on chain), sent before ``deadline`` (unix seconds)."""

    client: str
    broker: str
    cap: int
    expires_at: int
    nonce: int
    deadline: int

    def message(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "broker": self.broker,
            "cap": self.cap,
            "expiresAt": self.expires_at,
            "nonce": self.nonce,
            "deadline": self.deadline,
        }


def sign_api_key_request(key: bytes | str, domain: Domain, req: ApiKeyRequest) -> bytes:
    return sign_typed(key, domain, "ApiKeyRequest", req.message()).signature


@dataclass(frozen=True)
class ApiKeyGrant:
    api_key: str
    client: str
    spender: str
    cap: int
    expires_at: int


def bad_request(reason: str) -> Unauthenticated:
    return Unauthenticated(reason, kind="bad-api-key-request", title="Bad API key request")


def _check_values(req: ApiKeyRequest, now: int) -> None:
    """The request's numbers, before any signature work (each a 422 saying what to change)."""

    def invalid(reason: str) -> InvalidRequest:
        return InvalidRequest(reason, kind="bad-api-key-request", title="Bad API key request")

    if not 0 < req.cap <= MAX_CAP:
        raise invalid(f"cap {req.cap} must be > 0 and fit JobMarket's uint128 spending cap (<= {MAX_CAP})")
    if req.expires_at <= now:
        raise invalid(f"expires_at {req.expires_at} is already past (now {now}); ask for a key that expires later")
    if req.expires_at >= 2**64:
        raise invalid(f"expires_at {req.expires_at} does not fit uint64")
    if req.deadline > now + MAX_REQUEST_TTL_S:
        raise invalid(
            f"deadline {req.deadline} is {req.deadline - now} s ahead; a request may live at most "
            f"{MAX_REQUEST_TTL_S} s: sign it with a nearer deadline"
        )


def issue_api_key(
    ledger: Ledger, domain: Domain, broker: str, req: ApiKeyRequest, signature: bytes, now: int, escrow: int
) -> ApiKeyGrant:
    """Check a client's signed request and record a new key for it. ``escrow``: the client's
    escrow held for this broker (a key is issued only to a client that deposited: keys cost the
    broker storage, addresses cost nothing). The spender it names is not authorized on chain
    yet: the client does that (``setSpender``) with the returned address. Refusals (forged,
    stale, replayed, out of range, no escrow, too many keys) write nothing."""
    _check_values(req, now)
    if to_checksum_address(req.broker) != to_checksum_address(broker):
        raise bad_request(f"the request is for another broker ({req.broker}); this broker is {broker}")
    if req.deadline < now:
        raise bad_request(f"the request expired at {req.deadline} (now {now}); sign a new one")
    try:
        signer = recover_typed(domain, "ApiKeyRequest", req.message(), signature)
    except (ValueError, TypeError) as exc:
        raise bad_request(f"the signature does not decode ({exc}); sign the ApiKeyRequest typed data") from exc
    client = to_checksum_address(req.client)
    if signer != client:
        raise bad_request(
            f"the request is signed by {signer}, not by the client {client}: sign it with the client's key "
            f"(chain id {domain.chain_id}, JobMarket {domain.verifying_contract})"
        )
    if escrow <= 0:
        raise PaymentRefused(
            f"{client} holds no escrow for broker {broker}: deposit first (`dlis job deposit AMOUNT --account ...`), "
            "then ask for a key",
            kind="no-escrow",
            title="No escrow",
        )
    api_key = PREFIX + secrets.token_hex(24)
    spender: LocalAccount = Account.create()
    # The API key has 192 bits of entropy, so a cheap KDF is enough to encrypt with it.
    encrypted = Account.encrypt(spender.key, api_key, kdf="pbkdf2", iterations=1000)
    row = ApiKeyRow(
        key_hash=key_hash(api_key), client=client, cap=req.cap, expires_at=req.expires_at,
        signer_key=json.dumps(encrypted),
    )  # fmt: skip
    digest = "0x" + typed_digest(domain, "ApiKeyRequest", req.message()).hex()
    added = ledger.add_api_key(row, request_digest=digest, max_live=MAX_LIVE_KEYS, now=now)
    if added == "too-many":
        raise Overloaded(f"{client} holds {MAX_LIVE_KEYS} unexpired API keys here, the most it may", 3600)
    if added == "replayed":
        raise Conflict(
            f"this signed request ({digest}) was already answered with a key; sign a new one (fresh nonce)",
            kind="api-key-request-replayed",
            title="Request already answered",
        )
    return ApiKeyGrant(api_key, client, spender.address, req.cap, req.expires_at)


def create_api_key(
    ledger: Ledger, market: JobMarket, client: LocalAccount, cap: int, expires_at: int, *, broker: str
) -> ApiKeyGrant:
    """What ``dlis broker api-key`` does, in one process: sign a request, have it issued, and
    authorize the key's spender on chain. Returns the secret once."""
    now = market.client.timestamp()
    req = ApiKeyRequest(client.address, broker, cap, expires_at, secrets.randbits(64), now + MAX_REQUEST_TTL_S // 2)
    domain = market.domain()
    escrow = market.escrow_of(client.address, broker)
    grant = issue_api_key(ledger, domain, broker, req, sign_api_key_request(client.key, domain, req), now, escrow)
    market.set_spender(client, grant.spender, cap, expires_at)
    return grant


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
