"""Broker refusals as RFC 9457 problem details (``application/problem+json``): the one table from
domain error to HTTP status, and the body. ``app.py`` installs the handlers that use them."""

from __future__ import annotations

from typing import Any

from dlis_market.broker.errors import (  # re-exported: modules outside the broker core import them from here
    ClientLeft,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    Overloaded,
    PaymentRefused,
    Refusal,
    TooLarge,
    Unauthenticated,
    Unroutable,
    UpstreamFailed,
    bad_authorization,
    empty_prompt,
    insufficient_escrow,
    no_route,
    prompt_too_long,
    request_too_large,
    unknown_model,
)
from dlis_market.types import PROBLEM_TYPE_BASE

__all__ = [
    "STATUS",
    "ProblemError",
    "bad_authorization",
    "empty_prompt",
    "insufficient_escrow",
    "no_route",
    "problem_body",
    "prompt_too_long",
    "request_too_large",
    "status_of",
    "unknown_model",
]

# Domain refusal family -> HTTP status. The most specific class listed in an error's MRO wins.
STATUS: dict[type[Refusal], int] = {
    NotFound: 404,
    Unauthenticated: 401,
    Forbidden: 403,
    Conflict: 409,
    InvalidRequest: 422,
    TooLarge: 413,
    PaymentRefused: 402,
    Overloaded: 429,
    Unroutable: 503,
    UpstreamFailed: 502,
    ClientLeft: 499,
}


class ProblemError(Refusal):
    """A refusal raised with its HTTP status by modules that predate the domain errors
    (``auth.py``, ``apikeys.py``); new code raises a :mod:`dlis_market.broker.errors` refusal."""

    def __init__(self, status: int, slug: str, title: str, detail: str, **extra: Any):
        super().__init__(detail, kind=slug, title=title, **extra)
        self.status = status


def status_of(exc: Refusal) -> int:
    if isinstance(exc, ProblemError):
        return exc.status
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


def problem_body(exc: Refusal, instance: str) -> dict[str, Any]:
    status = status_of(exc)
    return {
        "type": PROBLEM_TYPE_BASE + exc.slug,
        "title": exc.heading,
        "status": status,
        "detail": exc.detail,
        "instance": instance,
        # Extension member in the shape OpenAI clients read, so their exceptions carry the detail.
        "error": {"message": exc.detail, "type": exc.slug, "code": status},
        **exc.extra,
    }


def problem_headers(exc: Refusal) -> dict[str, str]:
    return {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else {}
