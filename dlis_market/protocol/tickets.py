"""A broker's permission to open one session on one stage: a ``SessionTicket`` (EIP-712).

The broker signs it with its account key, the one holding BROKER_ROLE on JobMarket, under the
JobMarket domain. It names the job, model, layer range and price the broker will pay per token,
the peer id allowed to open the session (the broker's driver) and an expiry; a worker opens a
session only on a ticket from a broker, for exactly its own range and price, presented by the
peer it names, before it expires. Stolen tickets are useless to any other peer.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import ValidationError

from dlis_market.chain.typed_data import Domain, recover_typed, sign_typed
from dlis_market.protocol.errors import TicketError
from dlis_market.types import WireModel


class SessionTicket(WireModel):
    job_id: bytes  # 32 bytes
    model: str
    start: int
    end: int
    price_per_token: int
    opener: str  # peer id that may open the session
    expires_at: float  # unix time


class SignedTicket(WireModel):
    ticket: SessionTicket
    signature: bytes  # 65 bytes


def ticket_message(t: SessionTicket) -> dict[str, Any]:
    if len(t.job_id) != 32 or min(t.start, t.end, t.price_per_token) < 0 or t.expires_at < 0:
        raise TicketError(f"ticket has a {len(t.job_id)}-byte job id (need 32) or a negative field")
    return {
        "jobId": t.job_id,
        "model": t.model,
        "start": t.start,
        "end": t.end,
        "pricePerToken": t.price_per_token,
        "opener": t.opener,
        "expiresAtMs": round(t.expires_at * 1000),
    }


def sign_ticket(key: bytes | str, domain: Domain, ticket: SessionTicket) -> SignedTicket:
    return SignedTicket(
        ticket=ticket, signature=sign_typed(key, domain, "SessionTicket", ticket_message(ticket)).signature
    )


def parse_ticket(raw: Any) -> SignedTicket:
    if raw is None:
        raise TicketError("no session ticket: a session opens only on a ticket signed by a broker of the market")
    try:
        return SignedTicket.model_validate(raw)
    except ValidationError as exc:
        raise TicketError(f"malformed session ticket: {exc.errors()[0]['msg']}") from exc


def ticket_signer(domain: Domain, signed: SignedTicket) -> str:
    try:
        return recover_typed(domain, "SessionTicket", ticket_message(signed.ticket), signed.signature)
    except (ValueError, TypeError) as exc:
        raise TicketError(f"session ticket signature does not parse ({exc})") from exc


def check_ticket(
    domain: Domain,
    signed: SignedTicket,
    *,
    job_id: bytes,
    model: str,
    start: int,
    end: int,
    min_price: int,
    opener: str,
    now: float | None = None,
) -> str:
    """The ticket's signer if the ticket fits this session; TicketError naming the mismatch otherwise.

    Whether the signer is a broker is the caller's check (a chain lookup)."""
    t = signed.ticket
    now = time.time() if now is None else now
    if t.expires_at <= now:
        raise TicketError(f"session ticket expired {now - t.expires_at:.0f}s ago; ask the broker for a fresh one")
    if t.opener != opener:
        raise TicketError(f"session ticket names opener {t.opener}, not the peer opening the session ({opener})")
    if t.job_id != job_id or t.model != model or (t.start, t.end) != (start, end):
        raise TicketError(
            f"session ticket is for job {t.job_id.hex()[:16]}.. {t.model!r} [{t.start}, {t.end}), not job "
            f"{job_id.hex()[:16]}.. {model!r} [{start}, {end})"
        )
    if t.price_per_token < min_price:
        raise TicketError(
            f"session ticket pays {t.price_per_token} per token, below this node's price {min_price}; "
            "route on the node's current signed announcement"
        )
    return ticket_signer(domain, signed)
