"""Talking to the oracle over HTTP, the sender's side (workers and brokers): the worker's telemetry
(sign with the node key, POST) and :class:`OracleReceiver`, which delivers an outbox row
(:mod:`dlis_market.protocol.outbox`) to one oracle route and reads the oracle's answer, its
duplicate answers included, as an outbox verdict. The routes are served by
:mod:`dlis_market.oracle.server`.

Sequence numbers must strictly increase for the life of the node key, across worker restarts
(the oracle persists the last seq it accepted), so they are derived from the clock in
microseconds and bumped when two reports fall in the same microsecond.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp
import httpx

from dlis_market.chain.typed_data import Domain
from dlis_market.protocol.errors import TelemetryRefusedError
from dlis_market.protocol.outbox import Answer, Verdict, classify_http
from dlis_market.protocol.telemetry import (
    SignedTelemetry,
    TelemetryMetrics,
    TelemetryReport,
    encode_telemetry,
    sign_telemetry,
)
from dlis_market.types import NodeId

# Routes of the oracle that take outbox rows, and how each says "I already have it".
SPOT_CHECK_PATH = "/v1/spot-checks"  # a passed check posted again: 200 "pass", credited once
FAILURE_PATH = "/v1/spot-checks/failures"  # posted again: 200 {"recorded": false}
FINGERPRINT_PASS_PATH = "/v1/spot-checks/fingerprint-passes"  # posted again: 200 {"recorded": false}
OBSERVATIONS_PATH = "/v1/observations"  # posted again: 200 {"recorded": 0}
TELEMETRY_PATH = "/v1/telemetry"
# evidence already used for a slash (422): the slash happened, the row is done
SPOT_CHECK_DUPLICATES = frozenset({"already_slashed"})
# a seq at or below the last accepted one (409): this report or a newer one is in, the row is done
TELEMETRY_DUPLICATES = frozenset({"duplicate", "superseded"})
MAX_ANSWER_BYTES = 64 << 10  # an oracle answer is a small JSON object; more is not read as JSON


class OracleReceiver:
    """POSTs an outbox row's body to ``{oracle_url}{path}`` and turns the answer into an
    :class:`~dlis_market.protocol.outbox.Answer` (``body`` is the oracle's JSON answer)."""

    def __init__(
        self,
        oracle_url: str,
        path: str,
        content_type: str = "application/json",
        duplicate_reasons: frozenset[str] = frozenset(),
        timeout_s: float = 60.0,
    ) -> None:
        self.url = oracle_url.rstrip("/") + path
        self.content_type = content_type
        self.duplicate_reasons = duplicate_reasons
        self.timeout_s = timeout_s

    async def __call__(self, body: bytes) -> Answer:
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as http:
                res = await http.post(self.url, content=body, headers={"content-type": self.content_type})
        except httpx.TransportError as exc:  # down, refusing connections, timed out: try again later
            return Answer(Verdict.RETRY, f"cannot reach {self.url}: {exc!r}")
        answer: dict[str, Any] = {}
        if len(res.content) <= MAX_ANSWER_BYTES:
            try:
                parsed = res.json()
            except ValueError:
                parsed = None
            answer = parsed if isinstance(parsed, dict) else {}
        reason = answer.get("reason")
        verdict = classify_http(res.status_code, reason if isinstance(reason, str) else None, self.duplicate_reasons)
        detail = f"{res.status_code} {reason or res.reason_phrase}: {str(answer.get('detail', ''))[:300]}"
        return Answer(verdict, detail, answer, res.status_code)


class TelemetrySender:
    """Signs and sends one node's telemetry. ``domain`` is :func:`.telemetry.oracle_domain`."""

    def __init__(
        self, node_key: bytes, node_address: str, domain: Domain, clock: Callable[[], float] = time.time
    ) -> None:
        self.node_key = node_key
        self.node_address = node_address
        self.domain = domain
        self.clock = clock
        self._last_seq = -1

    def next_seq(self) -> int:
        self._last_seq = max(self._last_seq + 1, int(self.clock() * 1_000_000))
        return self._last_seq

    def sign(self, metrics: TelemetryMetrics) -> SignedTelemetry:
        report = TelemetryReport(
            node=NodeId(self.node_address), seq=self.next_seq(), timestamp=int(self.clock()), metrics=metrics
        )
        return sign_telemetry(self.node_key, self.domain, report)

    def blob(self, metrics: TelemetryMetrics) -> bytes:
        """A signed, compressed report: POST it to the oracle or relay it over the DHT."""
        return encode_telemetry(self.sign(metrics))

    async def send(self, session: aiohttp.ClientSession, oracle_url: str, metrics: TelemetryMetrics) -> dict[str, Any]:
        """POST one report to ``{oracle_url}/v1/telemetry``; a refusal raises with its reason."""
        return await post_blob(session, oracle_url, self.blob(metrics))


async def post_blob(session: aiohttp.ClientSession, oracle_url: str, blob: bytes) -> dict[str, Any]:
    """POST a signed blob to ``{oracle_url}/v1/telemetry``: the oracle's answer, or
    :class:`TelemetryRefusedError` with its reason (``malformed`` when the answer is not JSON)."""
    async with session.post(
        oracle_url.rstrip("/") + "/v1/telemetry", data=blob, headers={"content-type": "application/zstd"}
    ) as resp:
        try:
            body = await resp.json(content_type=None)
        except (ValueError, aiohttp.ClientError):
            body = None
        if not isinstance(body, dict):
            body = {"detail": body}
        if resp.status != 202:
            reason = str(body.get("reason", "malformed"))
            raise TelemetryRefusedError(
                reason, f"oracle refused it ({resp.status} {reason}): {body.get('detail', body)}"
            )
        return body
