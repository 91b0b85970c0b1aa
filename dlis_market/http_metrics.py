"""HTTP request metrics for the broker's and the oracle's APIs: one pure-ASGI middleware.

``<prefix>_http_requests_total{method, route, status}`` and ``<prefix>_http_request_seconds
{method, route}`` (to the last byte of the response, so a streamed answer counts whole). ``route``
is the matched route's template (``/v1/jobs/{job_id}``), never the raw path: a scan of random URLs
adds one ``unmatched`` series, not one per URL. Pure ASGI rather than Starlette's
``BaseHTTPMiddleware``, which would put a task and a queue on every request's hot path.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# One pair of collectors per (registry, prefix): an app built twice over one service's registry
# (tests, a reload) counts into the same series instead of failing on a duplicate name.
_REGISTERED: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, tuple[Counter, Histogram]]] = (
    weakref.WeakKeyDictionary()
)


def _collectors(registry: CollectorRegistry, prefix: str) -> tuple[Counter, Histogram]:
    known = _REGISTERED.setdefault(registry, {})
    if prefix not in known:
        known[prefix] = (
            Counter(
                f"{prefix}_http_requests", "HTTP requests by method, route template and status",
                ["method", "route", "status"], registry=registry,
            ),
            Histogram(
                f"{prefix}_http_request_seconds", "HTTP request time to the last response byte, by route template",
                ["method", "route"], buckets=REQUEST_BUCKETS, registry=registry,
            ),
        )  # fmt: skip
    return known[prefix]


class HttpMetrics:
    """Counts and times every HTTP request of the app it wraps (``app.add_middleware(HttpMetrics,
    registry=..., prefix="dlis_broker")``)."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry, prefix: str) -> None:
        self.app = app
        self.requests, self.seconds = _collectors(registry, prefix)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app raises before answering

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route: Any = scope.get("route")
            template = str(getattr(route, "path", None) or "unmatched")
            method = str(scope.get("method", ""))
            self.requests.labels(method, template, str(status)).inc()
            self.seconds.labels(method, template).observe(time.perf_counter() - started)
