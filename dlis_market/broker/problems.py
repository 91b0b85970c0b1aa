"""Errors as RFC 9457 problem details (``application/problem+json``)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from dlis_market.errors import BrokerError
from dlis_market.types import PROBLEM_TYPE_BASE


class ProblemError(BrokerError):
    """A refusal the API reports as problem JSON with an HTTP status."""

    def __init__(self, status: int, slug: str, title: str, detail: str, **extra: Any):
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.extra = extra

    def body(self, instance: str) -> dict[str, Any]:
        return {
            "type": PROBLEM_TYPE_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            # Extension member in the shape OpenAI clients read, so their exceptions carry the detail.
            "error": {"message": self.detail, "type": self.slug, "code": self.status},
            **self.extra,
        }


def insufficient_escrow(needed: int, available: int, client: str, withdrawing: int = 0) -> ProblemError:
    held = (
        f" ({withdrawing} token units are held back by your pending withdrawal request until it is "
        "carried out or expires)"
        if withdrawing
        else ""
    )
    return ProblemError(
        402,
        "insufficient-escrow",
        "Insufficient escrow",
        f"client {client} has {available} token units of free escrow{held} but the job may cost up to "
        f"{needed}; deposit more with `dlis job deposit AMOUNT` (nothing was run)",
        needed=str(needed),
        available=str(available),
        withdrawing=str(withdrawing),
    )


def request_too_large(size: int | None, limit: int) -> ProblemError:
    said = f"{size} bytes" if size is not None else "more than that"
    return ProblemError(
        413,
        "request-too-large",
        "Request too large",
        f"the request body is {said}, over the broker's limit of {limit} bytes; send a shorter prompt",
        limit=limit,
    )


def empty_prompt() -> ProblemError:
    return ProblemError(
        422, "empty-prompt", "Empty prompt", "the prompt has no tokens; send a non-empty `prompt` or `messages`"
    )


def bad_authorization(reason: str) -> ProblemError:
    return ProblemError(401, "bad-authorization", "Bad or expired authorization", reason)


def unknown_model(model: str, known: list[str]) -> ProblemError:
    return ProblemError(
        404,
        "unknown-model",
        "Unknown model",
        f"model {model!r} is not served here; available: {', '.join(known) or 'none'}",
    )


def prompt_too_long(tokens: int, limit: int) -> ProblemError:
    return ProblemError(
        413,
        "prompt-too-long",
        "Prompt too long",
        f"prompt is {tokens} tokens plus the requested completion, over the model's context of {limit}; shorten it",
        tokens=tokens,
        limit=limit,
    )


def no_route(reason: str) -> ProblemError:
    return ProblemError(503, "no-route", "No route satisfies the policy", reason)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return JSONResponse(exc.body(request.url.path), status_code=exc.status, media_type="application/problem+json")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        body = {
            "type": PROBLEM_TYPE_BASE + "invalid-request",
            "title": "Invalid request",
            "status": 422,
            "detail": "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors),
            "instance": request.url.path,
            "errors": errors,
        }
        return JSONResponse(body, status_code=422, media_type="application/problem+json")
