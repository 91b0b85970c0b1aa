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
    proof_unsupported,
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
    "openai_error",
    "openai_status",
    "problem_body",
    "prompt_too_long",
    "proof_unsupported",
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


def problem_body(exc: Refusal, instance: str, status: int | None = None) -> dict[str, Any]:
    """The problem JSON of a refusal (``status``: when the route answers another than the table's)."""
    status = status or status_of(exc)
    return {
        "type": PROBLEM_TYPE_BASE + exc.slug,
        "title": exc.heading,
        "status": status,
        "detail": exc.detail,
        "instance": instance,
        # Extension member in the shape OpenAI clients read, so their exceptions carry the detail.
        "error": openai_error(exc.detail, status, exc.slug, exc.extra.get("param")),
        **exc.extra,
    }


# OpenAI's error ``type`` by HTTP status (https://platform.openai.com/docs/guides/error-codes).
OPENAI_TYPES = {401: "authentication_error", 402: "insufficient_quota", 403: "permission_error",
                429: "rate_limit_error"}  # fmt: skip


def openai_error(message: str, status: int, slug: str, param: str | None = None) -> dict[str, Any]:
    """The ``{"message", "type", "param", "code"}`` object OpenAI answers under ``"error"``."""
    kind = OPENAI_TYPES.get(status, "server_error" if status >= 499 else "invalid_request_error")
    return {"message": message, "type": kind, "param": param, "code": slug.replace("-", "_")}


# The OpenAI-compatible routes (``routes/openai.py``) and every path under /v1 no route serves.
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


def openai_status(path: str, status: int) -> int:
    """The status an OpenAI route answers: OpenAI says 400 for every invalid request, where the
    native API says 422 (unprocessable) or 413 (prompt over the context)."""
    if path.startswith(OPENAI_PATHS) and status in (413, 422):
        return 400
    return status


def problem_headers(exc: Refusal) -> dict[str, str]:
    return {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else {}
