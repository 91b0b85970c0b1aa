"""Where the spot-check runner's evidence, failure reports and fingerprint passes go: the oracle,
through the broker's persisted outbox (``protocol/outbox.py``), so that nothing is lost while the
oracle or its chain is down, across a broker restart too, and nothing is counted twice.

Split from :mod:`dlis_market.broker.spot_checks` (which re-exports these names): the runner decides
what to check and builds the evidence; this module only delivers it and reads the answers.
"""

from __future__ import annotations

import logging
from typing import Any

from dlis_market.protocol.oracle_client import (
    FAILURE_PATH,
    FINGERPRINT_PASS_PATH,
    SPOT_CHECK_DUPLICATES,
    SPOT_CHECK_PATH,
    OracleReceiver,
)
from dlis_market.protocol.outbox import Answer, Delivery, DeliveryStatus, Message, Outbox, Verdict
from dlis_market.protocol.spot_checks import FingerprintCheckPass, RunnerStatement, SpotCheckEvidence, SpotCheckFailure

log = logging.getLogger(__name__)

EVIDENCE_KIND = "spot-check-evidence"
FAILURE_KIND = "spot-check-failure"
FINGERPRINT_PASS_KIND = "fingerprint-pass"
# Passes are credit, not evidence, and frequent (every accepted fingerprint check): at most the
# newest this many wait for the oracle or stay as dead letters when it refuses them (an oracle
# without the route, or one that does not trust this runner), so they never fill the outbox that
# slash evidence and failure reports need.
FINGERPRINT_PASSES_KEPT = 1000


def answer_dict(delivery: Delivery) -> dict[str, Any]:
    """The oracle's answer as :class:`CheckResult` reads it (``outcome`` and ``detail``)."""
    answer = delivery.answer
    if delivery.status is DeliveryStatus.QUEUED or answer is None:
        why = answer.detail if answer is not None else "earlier messages are waiting for the oracle"
        return {"outcome": "queued", "detail": f"kept in the outbox until the oracle takes it ({why})"}
    if answer.verdict is Verdict.DELIVERED:
        return dict(answer.body)
    if answer.verdict is Verdict.DUPLICATE:
        return {"outcome": "duplicate", "detail": answer.detail}
    return {"outcome": f"refused:{answer.body.get('reason', answer.status)}", "detail": answer.detail}


class OracleSink:
    """Sends evidence to the oracle's ``POST /v1/spot-checks``, failure reports to
    ``/v1/spot-checks/failures`` and fingerprint passes to ``/v1/spot-checks/fingerprint-passes``
    through ``outbox``: persisted before the first try, retried while the oracle is down or
    restarting, after a restart of the broker too (the oracle counts a message once, so a second
    delivery after a crash changes nothing). An answer is
    ``{"outcome": "pass" | "slashed" | "queued" | "duplicate" | "refused:<reason>", "detail": ...}``.

    Call :meth:`start` when the broker starts (rows an earlier run left are delivered) and
    :meth:`close` when it stops; :class:`SpotChecker` closes its sink."""

    def __init__(self, oracle_url: str, outbox: Outbox, timeout_s: float = 60.0) -> None:
        self.outbox = outbox
        evidence = OracleReceiver(
            oracle_url, SPOT_CHECK_PATH, duplicate_reasons=SPOT_CHECK_DUPLICATES, timeout_s=timeout_s
        )
        outbox.register(EVIDENCE_KIND, evidence, on_answer=_log_late)
        failures = OracleReceiver(oracle_url, FAILURE_PATH, timeout_s=timeout_s)
        outbox.register(FAILURE_KIND, failures, on_answer=_log_late)
        passes = OracleReceiver(oracle_url, FINGERPRINT_PASS_PATH, timeout_s=timeout_s)
        outbox.register(FINGERPRINT_PASS_KIND, passes, keep_latest=FINGERPRINT_PASSES_KEPT, on_answer=_log_late)

    def start(self) -> None:
        self.outbox.start()

    async def close(self) -> None:
        await self.outbox.close()

    async def submit(self, evidence: SpotCheckEvidence) -> dict[str, Any]:
        call = evidence.accused_receipt
        key = f"{evidence.accused_node.lower()}:{str(call.job_id).lower()}:{call.start}"
        return await self._send(EVIDENCE_KIND, key, evidence.model_dump_json().encode())

    async def report_failure(self, failure: SpotCheckFailure) -> dict[str, Any]:
        return await self._statement(FAILURE_KIND, failure)

    async def report_fingerprint_pass(self, passed: FingerprintCheckPass) -> dict[str, Any]:
        return await self._statement(FINGERPRINT_PASS_KIND, passed)

    async def _statement(self, kind: str, statement: RunnerStatement) -> dict[str, Any]:
        node, job, start = statement.key()
        return await self._send(kind, f"{node}:{job}:{start}", statement.model_dump_json().encode())

    async def _send(self, kind: str, key: str, body: bytes) -> dict[str, Any]:
        self.outbox.start()  # idempotent: the loop retries whatever cannot go now
        return answer_dict(await self.outbox.send(kind, key, body))


def _log_late(message: Message, answer: Answer) -> None:
    """Final answers of rows that waited in the outbox (the check's result said ``queued``)."""
    if answer.verdict is Verdict.REFUSED:
        log.warning("oracle refused %s %s for good (a dead letter in the outbox): %s", message.kind, message.key,
                    answer.detail)  # fmt: skip
    elif message.attempts:
        log.info("oracle took %s %s after %d tries: %s", message.kind, message.key, message.attempts, answer.detail)
