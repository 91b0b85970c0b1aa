"""Worker telemetry: what a worker measured, signed with its node key, on the DHT and to the oracle.

:class:`TelemetryRecorder` is fed by the worker (every forward pass, every closed session) and
turns what it saw since the previous report into one :class:`TelemetryMetrics`, then starts a new
interval. :class:`WorkerTelemetry` runs next to the worker: soon after start, then every
``node.telemetry_interval_s``, it signs one report (EIP-712 ``Telemetry`` in the domain of
``node.reputation_address``), POSTs the blob to ``{oracle_url}/v1/telemetry`` when
``node.oracle_url`` is set, then stores the same blob on the DHT. The POST goes through the
worker's outbox (:mod:`dlis_market.protocol.outbox`, a SQLite file ``outbox.db`` in the identity
folder unless ``node.outbox_url``): a report the oracle cannot take now is retried, after a worker
restart too, and counted once (the oracle answers a seq it already has with ``duplicate``). The
blob authenticates itself, so the DHT copy is as good as the POST: the oracle's DHT relay
(:mod:`dlis_market.oracle.dht_relay`) submits it when the POST did not arrive, and skips it when it
did (same seq). Failed stores and POSTs are logged with their reason; they never stop the worker.
With the zero ReputationOracle address telemetry is off.

DHT layout: key ``dlis/telemetry``, subkey = the node address (checksummed), value = the blob
(``zstd(json(SignedTelemetry))``), expiring two intervals after the store. The wire format, the key
and the reader are :mod:`dlis_market.protocol.telemetry`; the HTTP side is
:mod:`dlis_market.protocol.oracle_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp
import hivemind
from hivemind.utils import get_dht_time
from web3 import Web3

from dlis_market.protocol.errors import TelemetryRefusedError
from dlis_market.protocol.oracle_client import (
    TELEMETRY_DUPLICATES,
    TELEMETRY_PATH,
    OracleReceiver,
    TelemetrySender,
    post_blob,
)
from dlis_market.protocol.outbox import Answer, DeliveryStatus, Message, Outbox, Verdict
from dlis_market.protocol.telemetry import (
    MAX_JOBS,
    MAX_LATENCIES,
    TELEMETRY_KEY,
    JobOutcome,
    TelemetryMetrics,
    encode_telemetry,
    oracle_domain,
)
from dlis_market.types import ZERO_ADDRESS, LayerRange

log = logging.getLogger(__name__)

TELEMETRY_KIND = "telemetry"  # the outbox rows of telemetry reports
FIRST_REPORT_DELAY_S = 1.0  # a fresh worker is heard from this soon (or after one interval if shorter)
HTTP_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------- recorder


class TelemetryRecorder:
    """Counts what the worker did since the previous report; :meth:`report` returns it and resets.

    * ``measured_tps``: tokens processed (every session of every forward pass, prefill and decode)
      per second of forward-pass time. An interval without work repeats the last measured figure
      (0.0 before the first forward pass): an idle worker has not become slower.
    * ``latencies_ms``: one entry per decode forward pass, the first ``MAX_LATENCIES`` of the
      interval (the rest are dropped, not averaged in).
    * ``jobs``: one :class:`JobOutcome` per closed session, the first ``MAX_JOBS`` of the interval;
      sessions beyond that are counted in ``sessions_ok`` / ``sessions_failed`` instead, so each
      session is counted exactly once (the oracle adds both up).
    """

    def __init__(
        self,
        *,
        served: LayerRange | None,
        advertised_tps: float,
        free_kv_slots: Callable[[], int],
        gflops: float | None = None,
        memory_mib: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.served = served
        self.advertised_tps = advertised_tps
        self.free_kv_slots = free_kv_slots
        self.gflops = gflops
        self.memory_mib = memory_mib
        self.clock = clock
        self.started = clock()
        self.last_measured_tps = 0.0
        self._reset()

    def _reset(self) -> None:
        self.tokens = 0
        self.busy_s = 0.0
        self.latencies_ms: list[float] = []
        self.dropped_latencies = 0
        self.jobs: list[JobOutcome] = []
        self.sessions_ok = 0
        self.sessions_failed = 0

    def on_step(self, phase: str, tokens: int, seconds: float) -> None:
        """One forward pass: ``tokens`` over all its sessions, ``phase`` "prefill" or "decode"."""
        if seconds < 0 or tokens < 0:
            return
        self.tokens += tokens
        self.busy_s += seconds
        if phase == "decode":
            if len(self.latencies_ms) < MAX_LATENCIES:
                self.latencies_ms.append(seconds * 1000.0)
            else:
                self.dropped_latencies += 1

    def decode_latency_ms(self) -> float:
        """Mean decode step latency of this interval (0.0 without a decode step)."""
        return sum(self.latencies_ms) / len(self.latencies_ms) if self.latencies_ms else 0.0

    def on_session_closed(self, job_id: bytes, ok: bool, tokens: int, latency_ms: float | None = None) -> None:
        """A session of job ``job_id`` ended. ``latency_ms`` defaults to this interval's mean decode
        step latency (the oracle pools job latencies with step latencies for its median)."""
        if latency_ms is None:
            latency_ms = self.decode_latency_ms()
        if len(self.jobs) < MAX_JOBS and len(job_id) == 32:
            self.jobs.append(
                JobOutcome(job_id="0x" + job_id.hex(), ok=ok, latency_ms=max(0.0, latency_ms), tokens=max(0, tokens))
            )
        elif ok:
            self.sessions_ok += 1
        else:
            self.sessions_failed += 1

    def report(self) -> TelemetryMetrics:
        """The metrics of the interval since the previous call; starts the next interval."""
        if self.busy_s > 0:
            self.last_measured_tps = self.tokens / self.busy_s
        metrics = TelemetryMetrics(
            uptime_s=max(0.0, self.clock() - self.started),
            served=self.served,
            advertised_tps=self.advertised_tps,
            measured_tps=self.last_measured_tps,
            free_kv_slots=max(0, int(self.free_kv_slots())),
            gflops=self.gflops,
            memory_mib=self.memory_mib,
            latencies_ms=tuple(self.latencies_ms),
            sessions_ok=self.sessions_ok,
            sessions_failed=self.sessions_failed,
            jobs=tuple(self.jobs),
        )
        self._reset()
        return metrics


# ---------------------------------------------------------------------- DHT records


def store_telemetry(dht: hivemind.DHT, node_address: str, blob: bytes, ttl_s: float) -> bool:
    """Store ``blob`` under ``dlis/telemetry`` / ``node_address``, expiring in ``ttl_s``; the oracle
    reads it back with :func:`dlis_market.protocol.telemetry.fetch_telemetry`."""
    return bool(dht.store(TELEMETRY_KEY, blob, get_dht_time() + ttl_s, subkey=node_address))


# ---------------------------------------------------------------------- sender loop


class WorkerTelemetry:
    """Signs one report per interval, POSTs it to the oracle (if set) and stores it on the DHT."""

    def __init__(
        self,
        recorder: TelemetryRecorder,
        *,
        node_key: bytes,
        node_address: str,
        chain_id: int,
        reputation_address: str,
        dht: hivemind.DHT | None,
        interval_s: float,
        oracle_url: str | None = None,
        outbox: Outbox | None = None,
        keep_unsent: int = 2,
        post_timeout_s: float = HTTP_TIMEOUT_S,
    ) -> None:
        """``outbox``: where POSTs the oracle cannot take now wait (None: such a report is only on
        the DHT); ``keep_unsent``: how many unsent reports it keeps, newest first."""
        self.recorder = recorder
        self.node_address = Web3.to_checksum_address(node_address)
        self.enabled = reputation_address.lower() != ZERO_ADDRESS
        self.sender = (
            TelemetrySender(node_key, self.node_address, oracle_domain(chain_id, reputation_address))
            if self.enabled
            else None
        )
        self.dht = dht
        self.interval_s = max(interval_s, 0.1)
        self.ttl_s = 2 * self.interval_s
        self.oracle_url = oracle_url.rstrip("/") if oracle_url else None
        self.sent = 0  # reports delivered over HTTP (202)
        self.stored = 0  # reports stored on the DHT
        self._last_problem: dict[str, str] = {}  # "http" / "dht" -> the last failure, logged once
        self.outbox = outbox if self.enabled and self.oracle_url is not None else None
        if self.outbox is not None and self.oracle_url is not None:
            receiver = OracleReceiver(self.oracle_url, TELEMETRY_PATH, "application/zstd", TELEMETRY_DUPLICATES,
                                      min(post_timeout_s, max(self.interval_s, 1.0)))  # fmt: skip
            # Telemetry is periodic and the oracle refuses a report older than its
            # telemetry_max_age_s (120 s) as stale, and one below a seq it already took as superseded:
            # only the newest few unsent reports are worth keeping, older ones are dropped.
            self.outbox.register(TELEMETRY_KIND, receiver, keep_latest=keep_unsent, on_answer=self._answered)

    async def run(self, stop: asyncio.Event) -> None:
        """Report soon after start, then every interval, until ``stop`` (or cancellation)."""
        if not self.enabled:
            log.info("telemetry is off: no ReputationOracle address (--reputation / DLIS_NODE__REPUTATION_ADDRESS)")
            return
        timeout = aiohttp.ClientTimeout(total=min(HTTP_TIMEOUT_S, max(self.interval_s, 1.0)))
        if self.outbox is not None:
            self.outbox.start()  # reports an earlier run could not deliver go out first
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                delay = min(FIRST_REPORT_DELAY_S, self.interval_s)
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):  # the timeout is the normal wake-up
                        await asyncio.wait_for(stop.wait(), delay)
                    if stop.is_set():
                        break
                    delay = self.interval_s
                    try:
                        await self.report_once(session)
                    except Exception:  # telemetry must never take the worker down
                        log.exception("telemetry report failed; next one in %.0f s", self.interval_s)
        finally:
            if self.outbox is not None:  # unsent reports stay in the file for the next start
                await self.outbox.close()

    async def report_once(self, session: aiohttp.ClientSession | None) -> bytes:
        """Sign the current interval's metrics, POST the blob, then store it on the DHT; the blob.

        POST first: the oracle's DHT relay then finds the copy only after the oracle had its chance
        to accept it over HTTP, so the relay skips it instead of beating the POST to the intake
        (which would make the POST a ``duplicate`` refusal).
        """
        assert self.sender is not None, "telemetry is off"
        signed = self.sender.sign(self.recorder.report())
        blob = encode_telemetry(signed)
        if self.outbox is not None:
            self._note("http", await self._post_via_outbox(signed.report.seq, blob))
        elif self.oracle_url is not None and session is not None:
            self._note("http", await self._post(session, blob))
        if self.dht is not None:
            try:
                ok = await asyncio.to_thread(store_telemetry, self.dht, self.node_address, blob, self.ttl_s)
                problem = "" if ok else "no DHT peer accepted the record"
            except Exception as exc:  # the daemon may be busy or restarting; the next interval retries
                ok, problem = False, repr(exc)
            self.stored += ok
            self._note("dht", problem)
        return blob

    async def _post(self, session: aiohttp.ClientSession, blob: bytes) -> str:
        """POST the blob (the same bytes as on the DHT, so the oracle sees one seq); '' or why not."""
        assert self.oracle_url is not None
        try:
            await post_blob(session, self.oracle_url, blob)
        except TelemetryRefusedError as exc:
            return str(exc)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"cannot reach {self.oracle_url}/v1/telemetry: {exc!r} (the report still goes on the DHT)"
        self.sent += 1
        return ""

    async def _post_via_outbox(self, seq: int, blob: bytes) -> str:
        """Queue the blob (one row per seq) and try it now; '' or why it did not go now."""
        assert self.outbox is not None
        delivery = await self.outbox.send(TELEMETRY_KIND, str(seq), blob)
        if delivery.done:
            return ""
        detail = delivery.answer.detail if delivery.answer else "earlier reports are waiting for the oracle"
        if delivery.status is DeliveryStatus.DEAD:  # detail: "<status> <reason>: <the oracle's detail>"
            head, _, rest = detail.partition(": ")
            return f"oracle refused it ({head}): {rest}"
        return (f"cannot deliver to {self.oracle_url}{TELEMETRY_PATH} now: {detail} (kept in the outbox and "
                "retried; the report still goes on the DHT)")  # fmt: skip

    def _answered(self, message: Message, answer: Answer) -> None:
        """Every final answer of a queued report, also ones an earlier run of this worker queued."""
        if answer.verdict is Verdict.DELIVERED:
            self.sent += 1

    def _note(self, path: str, problem: str) -> None:
        """Log a failure when it first appears or changes, and the recovery; not every interval."""
        last = self._last_problem.get(path, "")
        if problem and problem != last:
            log.warning("telemetry via %s failed: %s", path, problem)
        elif problem:
            log.debug("telemetry via %s still failing: %s", path, problem)
        elif last:
            log.info("telemetry via %s works again", path)
        self._last_problem[path] = problem
