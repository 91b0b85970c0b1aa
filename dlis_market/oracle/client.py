"""Worker side of telemetry: sign reports with the node key and POST them to the oracle.

Sequence numbers must strictly increase for the life of the node key, across worker restarts
(the oracle persists the last seq it accepted), so they are derived from the clock in
microseconds and bumped when two reports fall in the same microsecond.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp

from dlis_market.chain.typed_data import Domain
from dlis_market.oracle.errors import TelemetryRefusedError
from dlis_market.oracle.telemetry import (
    SignedTelemetry,
    TelemetryMetrics,
    TelemetryReport,
    encode_telemetry,
    sign_telemetry,
)
from dlis_market.types import NodeId


class TelemetrySender:
    """Signs and sends one node's telemetry. ``domain`` is :func:`telemetry.oracle_domain`."""

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
