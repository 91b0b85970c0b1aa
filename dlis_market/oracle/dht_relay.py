"""Telemetry relayed on the DHT: the oracle reads the reports workers store there and submits them.

Workers store each signed report under ``dlis/telemetry`` (subkey = node address,
:mod:`dlis_market.protocol.telemetry`), whether or not they also POST it. When
``oracle.dht_initial_peers`` is set, the oracle joins the swarm as a DHT client (loopback,
private: :func:`dlis_market.node.transport.start_dht`) and every ``heartbeat_interval_s`` reads the
key and hands each blob to :meth:`OracleService.submit_telemetry`, the same checks as HTTP.

The same report usually arrives twice (POST and DHT) and stays on the DHT for about two
intervals, so before submitting, the relay skips a blob it already handled (same bytes) and a
report whose seq is not above the node's last accepted seq: those are copies, and are not counted
as refusals. Anything else refused is counted by its reason as usual, once per
distinct blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence

import hivemind

from dlis_market.errors import OracleError
from dlis_market.node.transport import start_dht
from dlis_market.oracle.service import OracleService
from dlis_market.protocol.errors import TelemetryRefusedError
from dlis_market.protocol.telemetry import decode_telemetry, fetch_telemetry

log = logging.getLogger(__name__)


class DhtTelemetryRelay:
    """Polls the DHT for telemetry and submits new reports to ``service``.

    ``counts``: ``submitted`` (accepted), ``duplicate`` (already accepted, e.g. over HTTP),
    ``refused`` (by any reason; the intake counts the reason) and ``unreadable`` (the DHT read
    failed).
    """

    def __init__(
        self,
        service: OracleService,
        initial_peers: Sequence[str],
        *,
        interval_s: float | None = None,
        dht_factory: Callable[[Sequence[str]], hivemind.DHT] | None = None,
    ) -> None:
        self.service = service
        self.initial_peers = list(initial_peers)
        self.interval_s = interval_s if interval_s is not None else service.config.heartbeat_interval_s
        self._dht_factory = dht_factory or (lambda peers: start_dht(peers, client_mode=True))
        self.dht: hivemind.DHT | None = None
        self.counts: Counter[str] = Counter()
        self._seen: set[bytes] = set()  # digests of the blobs handled in the previous pass

    async def start(self) -> None:
        if self.dht is None:
            try:
                self.dht = await asyncio.to_thread(self._dht_factory, self.initial_peers)
            except Exception as exc:  # hivemind raises plain errors (e.g. no initial peer answered)
                raise OracleError(
                    f"cannot join the DHT via {', '.join(self.initial_peers)}: {exc}; check --initial-peer "
                    "(a worker's or the swarm bootstrap's /ip4/127.0.0.1/tcp/PORT/p2p/PEER multiaddr)"
                ) from exc
            log.info("telemetry DHT relay joined the swarm via %d initial peers", len(self.initial_peers))

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every interval until ``stop``; a failed pass is logged and retried next interval."""
        await self.start()
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.poll_once)
            except Exception:  # keep relaying; the HTTP intake is unaffected
                log.exception("telemetry DHT relay pass failed; retrying in %.0f s", self.interval_s)
            with contextlib.suppress(TimeoutError):  # the timeout is the normal wake-up
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def close(self) -> None:
        if self.dht is not None:
            dht, self.dht = self.dht, None
            await asyncio.to_thread(dht.shutdown)

    def poll_once(self) -> Counter[str]:
        """Read ``dlis/telemetry`` once and submit what is new; the outcomes of this pass."""
        assert self.dht is not None, "start() the relay first"
        try:
            blobs = fetch_telemetry(self.dht)
        except Exception as exc:  # the daemon may be busy; the reports stay on the DHT a while
            log.warning("reading telemetry from the DHT failed: %r", exc)
            self.counts["unreadable"] += 1
            return Counter(unreadable=1)
        outcome: Counter[str] = Counter()
        seen: set[bytes] = set()
        for subkey, blob in blobs.items():
            digest = hashlib.sha256(blob).digest()
            seen.add(digest)
            if digest not in self._seen:
                outcome[self._submit(subkey, blob)] += 1
        self._seen = seen
        self.counts.update(outcome)
        return outcome

    def _submit(self, subkey: str, blob: bytes) -> str:
        intake = self.service.intake
        try:
            signed = decode_telemetry(blob, intake.max_bytes, intake.max_decompressed_bytes)
        except TelemetryRefusedError:
            signed = None  # submitted anyway below, so the intake counts it as oversized / malformed
        if signed is not None:
            report = signed.report
            last = intake.last_seq.get(report.node)
            if last is not None and report.seq <= last:
                return "duplicate"
        try:
            self.service.submit_telemetry(blob)
        except TelemetryRefusedError as exc:
            if signed is not None and exc.reason in ("duplicate", "superseded"):
                # its seq was above the node's last one a moment ago: the same (or a newer) report
                # was accepted over HTTP in between. A copy, not a refusal: take the count back.
                self.service.uncount_refusal(exc.reason)
                return "duplicate"
            log.info("telemetry from the DHT (subkey %s) refused: %s", subkey, exc)
            return "refused"
        return "submitted"
