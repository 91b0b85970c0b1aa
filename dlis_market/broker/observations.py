"""What the broker saw each stage of a job do, signed and posted to the oracle.

Reputation scores throughput, latency and finished sessions on these observations, not on a
worker's own telemetry (``dlis_market/oracle/observations.py``). The broker times each job it
drives: the tokens the route generated and the wall time they took; every stage of the route that
finished the job is observed with those figures (a driver sees only the last stage's tokens, so a
stage is credited with the route it served in; over many routes the nodes separate), and a stage
that failed the job (the one a failover replaced) is observed as not ok. ``routed_tps`` is the
throughput each node advertised in the record the broker routed on: what its speed is held against.

Wiring: after a job, ``await observer.report(observe_job(...))``; signing uses the broker's
spot-check runner key (the broker account, one of the oracle's ``spot_check_runners``). Reporting
never delays or fails a job: a refusal is logged and counted; while the oracle is unreachable the
batches wait in the broker's outbox (:mod:`dlis_market.protocol.outbox`) and go out when it is back.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import httpx

from dlis_market.chain.typed_data import Domain
from dlis_market.errors import DlisError
from dlis_market.protocol.observations import MAX_OBSERVATIONS, ObservationBatch, StageObservation
from dlis_market.protocol.oracle_client import OBSERVATIONS_PATH, OracleReceiver
from dlis_market.protocol.outbox import DeliveryStatus, Outbox, Verdict
from dlis_market.protocol.routes import RouteHop

log = logging.getLogger(__name__)

UINT32_MAX = 2**32 - 1


class ObservationSink(Protocol):
    async def observe(self, batch: ObservationBatch) -> dict[str, Any]: ...


def observe_job(
    job_id: bytes,
    route: Sequence[RouteHop],
    tokens: int,
    elapsed_s: float,
    *,
    failed: Sequence[RouteHop] = (),
    routed_tps: Mapping[str, float] | None = None,
) -> list[StageObservation]:
    """Unsigned observations of one job: each hop of the ``route`` that finished it generated
    ``tokens`` in ``elapsed_s`` (the broker's clock); each hop in ``failed`` failed it.
    ``routed_tps`` maps a peer id to the throughput of the record the broker routed on. Pure."""
    if tokens < 0 or elapsed_s < 0:
        raise ValueError(f"a job generates tokens >= 0 in elapsed_s >= 0, got {tokens} in {elapsed_s}")
    tps = routed_tps or {}
    job = "0x" + job_id.hex()
    latency_ms = min(UINT32_MAX, round(elapsed_s * 1000))

    def one(hop: RouteHop, ok: bool) -> StageObservation:
        return StageObservation(
            node=hop.node, job_id=job, start=hop.start, end=hop.end,
            tokens=min(tokens, UINT32_MAX) if ok else 0, latency_ms=latency_ms if ok else 0,
            routed_tps=float(tps.get(hop.peer_id, 0.0)), ok=ok,
        )  # fmt: skip

    return [one(hop, True) for hop in route] + [one(hop, False) for hop in failed]


OBSERVATIONS_KIND = "observations"


class OracleObservationSink:
    """``POST {oracle_url}/v1/observations`` through ``outbox``: a batch is persisted before the
    first try and retried while the oracle is down, after a broker restart too (the oracle counts
    each node, job and stage once). The answer: the oracle's ``{"recorded": n, "of": m}``,
    ``{"queued": reason}`` (delivered later by the outbox loop) or ``{"refused": reason, ...}``.
    Call :meth:`start` when the broker starts and :meth:`close` when it stops."""

    def __init__(self, oracle_url: str, outbox: Outbox, timeout_s: float = 30.0) -> None:
        self.outbox = outbox
        outbox.register(OBSERVATIONS_KIND, OracleReceiver(oracle_url, OBSERVATIONS_PATH, timeout_s=timeout_s))

    def start(self) -> None:
        self.outbox.start()

    async def close(self) -> None:
        await self.outbox.close()

    async def observe(self, batch: ObservationBatch) -> dict[str, Any]:
        body = batch.model_dump_json().encode()
        self.outbox.start()  # idempotent: the loop retries whatever cannot go now
        # signatures are deterministic, so the same observations make the same body and the same key
        delivery = await self.outbox.send(OBSERVATIONS_KIND, hashlib.sha256(body).hexdigest(), body)
        answer = delivery.answer
        if delivery.status is DeliveryStatus.QUEUED or answer is None:
            return {"queued": answer.detail if answer else "earlier batches are waiting for the oracle"}
        if answer.verdict is Verdict.REFUSED:
            return {"refused": answer.body.get("reason", answer.status), "detail": answer.detail}
        return dict(answer.body) if answer.verdict is Verdict.DELIVERED else {"recorded": 0}


class JobObserver:
    """Signs observations with the runner key and hands them to the oracle, in batches."""

    def __init__(self, runner_key: bytes, oracle_domain: Domain, sink: ObservationSink) -> None:
        self.runner_key = runner_key
        self.oracle_domain = oracle_domain
        self.sink = sink
        self.counts: Counter[str] = Counter()  # recorded | duplicate | queued | refused:<reason> | error

    async def report(self, observations: Sequence[StageObservation]) -> None:
        signed = [o.signed_by_runner(self.runner_key, self.oracle_domain) for o in observations]
        for i in range(0, len(signed), MAX_OBSERVATIONS):
            chunk = signed[i : i + MAX_OBSERVATIONS]
            try:
                answer = await self.sink.observe(ObservationBatch(observations=tuple(chunk)))
            except (httpx.HTTPError, DlisError, ValueError) as exc:  # the oracle is down: the job is not affected
                self.counts["error"] += len(chunk)
                log.warning("could not post %d observations to the oracle: %s", len(chunk), exc)
                continue
            if "queued" in answer:  # the oracle is down: the outbox delivers it later
                self.counts["queued"] += len(chunk)
                log.info("%d observations wait in the outbox for the oracle: %s", len(chunk), answer["queued"])
                continue
            if "refused" in answer:
                self.counts[f"refused:{answer['refused']}"] += len(chunk)
                log.warning("oracle refused %d observations: %s %s", len(chunk), answer["refused"], answer["detail"])
                continue
            recorded = int(answer.get("recorded", 0))
            self.counts["recorded"] += recorded
            self.counts["duplicate"] += len(chunk) - recorded
