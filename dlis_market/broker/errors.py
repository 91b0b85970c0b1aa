"""What the broker refuses and why, as domain errors with no HTTP in them.

Each refusal has a ``kind`` (a stable slug clients match on), a ``title`` and extension members
(numbers a client can act on). The API maps the classes below to HTTP statuses and RFC 9457
problem JSON in one place (:mod:`dlis_market.broker.problems`, installed by ``app.py``); code
outside the routes never picks a status.
"""

from __future__ import annotations

from typing import Any, ClassVar

from dlis_market.errors import BrokerError


class Refusal(BrokerError):
    """A request the broker refuses. ``kind``/``title`` default to the class's; ``extra`` holds
    extension members for the problem body."""

    kind: ClassVar[str] = "refused"
    title: ClassVar[str] = "Request refused"

    def __init__(self, detail: str, *, kind: str | None = None, title: str | None = None, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.slug = kind or self.kind
        self.heading = title or self.title
        self.extra = extra


# Families: the API gives each one status (problems.STATUS).
class NotFound(Refusal):
    kind, title = "not-found", "Not found"


class Unauthenticated(Refusal):
    kind, title = "unauthenticated", "Not authenticated"


class Forbidden(Refusal):
    kind, title = "forbidden", "Forbidden"


class Conflict(Refusal):
    kind, title = "conflict", "Conflict"


class InvalidRequest(Refusal):
    kind, title = "invalid-request", "Invalid request"


class TooLarge(Refusal):
    kind, title = "too-large", "Too large"


class PaymentRefused(Refusal):
    kind, title = "payment-refused", "Payment refused"


class Unroutable(Refusal):
    kind, title = "no-route", "No route satisfies the policy"


class UpstreamFailed(Refusal):
    kind, title = "upstream-failed", "The workers failed"


class ClientLeft(Refusal):
    kind, title = "client-closed-request", "Client closed request"


class Overloaded(Refusal):
    """The broker cannot take the job now; a client should try again after ``retry_after_s``."""

    kind, title = "overloaded", "Broker at capacity"

    def __init__(self, reason: str, retry_after_s: int):
        super().__init__(
            f"the broker is at capacity: {reason}; nothing was run or reserved, retry after {retry_after_s} s",
            retry_after=retry_after_s,
        )
        self.reason = reason
        self.retry_after_s = retry_after_s


# The refusals themselves.
def unknown_model(model: str, known: list[str]) -> NotFound:
    return NotFound(
        f"model {model!r} is not served here; available: {', '.join(known) or 'none'}",
        kind="unknown-model",
        title="Unknown model",
    )


def unknown_job(job_id: str) -> NotFound:
    return NotFound(f"no job {job_id}", kind="unknown-job", title="Unknown job")


def bad_authorization(reason: str) -> Unauthenticated:
    return Unauthenticated(reason, kind="bad-authorization", title="Bad or expired authorization")


def not_your_job(detail: str) -> Forbidden:
    return Forbidden(detail, kind="not-your-job", title="Not your job")


def nonce_used(detail: str) -> Conflict:
    return Conflict(detail, kind="nonce-used", title="Nonce already used")


def empty_prompt() -> InvalidRequest:
    return InvalidRequest(
        "the prompt has no tokens; send a non-empty `prompt` or `messages`", kind="empty-prompt", title="Empty prompt"
    )


def proof_unsupported(model: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"model {model} cannot be proven: {why}; submit the job without `proof`",
        kind="proof-unsupported",
        title="No proof for this model",
        model=model,
    )


def privacy_unsupported(model: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"model {model} cannot run with privacy=high here: {why}",
        kind="privacy-unsupported",
        title="No private first stage for this model",
        model=model,
    )


def idempotency_key_reused(key: str, window_s: float) -> InvalidRequest:
    return InvalidRequest(
        f"Idempotency-Key {key[:64]!r} was used for a different request within the last {window_s:.0f} s; "
        "use a new key for a new request",
        kind="idempotency-key-reused",
        title="Idempotency key reused",
    )


def prompt_too_long(tokens: int, limit: int) -> TooLarge:
    return TooLarge(
        f"prompt is {tokens} tokens plus the requested completion, over the model's context of {limit}; shorten it",
        kind="prompt-too-long",
        title="Prompt too long",
        tokens=tokens,
        limit=limit,
    )


def prompt_bytes_too_long(size: int, widest: int, limit: int) -> TooLarge:
    return TooLarge(
        f"the prompt is {size} bytes, so at least {size // widest} tokens (no token is longer than {widest} bytes), "
        f"over the model's context of {limit}; shorten it",
        kind="prompt-too-long",
        title="Prompt too long",
        limit=limit,
    )


def request_too_large(size: int | None, limit: int) -> TooLarge:
    said = f"{size} bytes" if size is not None else "more than that"
    return TooLarge(
        f"the request body is {said}, over the broker's limit of {limit} bytes; send a shorter prompt",
        kind="request-too-large",
        title="Request too large",
        limit=limit,
    )


def authorization_too_low(total: int, allowed: int) -> PaymentRefused:
    return PaymentRefused(
        f"the job may cost up to {total} token units but the authorization allows {allowed}; "
        "sign a larger max_cost or ask for fewer tokens",
        kind="authorization-too-low",
        title="Authorization too low",
    )


def insufficient_escrow(needed: int, available: int, client: str, broker: str, withdrawing: int = 0) -> PaymentRefused:
    """Escrow is held per broker: only what the client deposited for ``broker`` counts here."""
    held = (
        f" ({withdrawing} token units are held back by your pending withdrawal request until it is "
        "carried out or expires)"
        if withdrawing
        else ""
    )
    return PaymentRefused(
        f"client {client} has {available} token units of free escrow for broker {broker}{held} but the job "
        f"may cost up to {needed}; deposit more for this broker with `dlis job deposit AMOUNT --broker {broker}` "
        "(nothing was run)",
        kind="insufficient-escrow",
        title="Insufficient escrow",
        needed=str(needed),
        available=str(available),
        withdrawing=str(withdrawing),
    )


def no_route(reason: str) -> Unroutable:
    return Unroutable(reason)


def incomplete_receipts(layer: int) -> UpstreamFailed:
    return UpstreamFailed(
        f"no stage receipt starts at layer {layer}", kind="incomplete-receipts", title="Incomplete receipts"
    )


def job_failed(detail: str) -> UpstreamFailed:
    return UpstreamFailed(detail, kind="job-failed", title="Job failed")


def client_left(job_id: str) -> ClientLeft:
    return ClientLeft(f"the client left job {job_id}")
