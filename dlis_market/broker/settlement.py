"""Batched on-chain settlement of completed jobs, idempotent across crashes and restarts.

One pass (:meth:`Settler.settle_once`):
1. Finish open batches first. A batch row is committed *before* its transaction is sent, so after
   a crash it is still open: if JobMarket already shows the batch id as settled, it is marked
   settled (tx found from the ``BatchSettled`` event); otherwise it is sent again. JobMarket
   refuses a used batch id and every used (client, nonce), so nothing is ever paid twice.
2. Group completed, unbatched jobs into a new batch and send it. The transaction is simulated
   first; when one job is invalid (the custom error names its index) that job is marked failed
   with the reason and the rest are retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from dlis_market.broker.ledger import JobRow, Ledger
from dlis_market.chain.errors import ContractRevertError, PreflightError
from dlis_market.chain.job_market import JobAuthorization, JobMarket, Receipt, SignedJob, SignedReceipt
from dlis_market.chain.typed_data import CompactSignature

log = logging.getLogger(__name__)


def _b(hex_str: str) -> bytes:
    return bytes.fromhex(hex_str.removeprefix("0x"))


def signed_job(row: JobRow, broker: str) -> SignedJob:
    """Rebuild the on-chain job (authorization + receipts) from the ledger."""
    auth = JobAuthorization(
        client=row.client,
        broker=broker,
        model_id=_b(row.model_id),
        max_cost=row.max_cost,
        nonce=row.nonce,
        deadline=row.deadline,
    )
    receipts = [
        SignedReceipt(
            Receipt(_b(row.id), _b(row.model_id), r.start, r.end, r.tokens, _b(r.output_hash), r.amount),
            CompactSignature.from_bytes(_b(r.signature)),
        )
        for r in row.receipts
    ]
    return SignedJob(auth, CompactSignature.from_bytes(_b(row.auth_signature)), receipts)


@dataclass
class SettleResult:
    settled_batches: list[str]
    failed_jobs: list[str]


class Settler:
    def __init__(
        self,
        ledger: Ledger,
        market: JobMarket,
        broker: LocalAccount,
        max_batch: int = 50,
        on_settled: Callable[[str, str | None], None] | None = None,
    ):
        self.ledger = ledger
        self.market = market
        self.broker = broker
        self.max_batch = max_batch
        self.on_settled = on_settled

    def settle_once(self) -> SettleResult:
        result = SettleResult([], [])
        for batch in self.ledger.open_batches():
            self._finish(batch.id, result)
        while True:
            jobs = self.ledger.unsettled_jobs(self.max_batch)
            if not jobs:
                break
            batch_id = self.ledger.create_batch([j.id for j in jobs])
            self._finish(batch_id, result)
        return result

    def _finish(self, batch_id: str, result: SettleResult) -> None:
        bid = _b(batch_id)
        if self.market.batch_settled(bid):
            tx, block = self._find_settlement(bid)
            self.ledger.mark_batch_settled(batch_id, tx, block)
            result.settled_batches.append(batch_id)
            if self.on_settled:
                self.on_settled(batch_id, tx)
            return
        jobs = self.ledger.batch_jobs(batch_id)
        while jobs:
            self.ledger.note_attempt(batch_id)
            try:
                receipt = self.market.settle_batch(self.broker, bid, [signed_job(j, self.broker.address) for j in jobs])
            except ContractRevertError as exc:
                if exc.error == "JobMarketBatchAlreadySettled":
                    tx, block = self._find_settlement(bid)
                    self.ledger.mark_batch_settled(batch_id, tx, block)
                    result.settled_batches.append(batch_id)
                    return
                index = exc.error_args.get("jobIndex")
                if not isinstance(index, int) or index >= len(jobs):
                    self.ledger.release_batch(batch_id, str(exc))
                    raise
                bad = jobs.pop(index)
                log.warning("job %s cannot settle and is dropped from batch %s: %s", bad.id, batch_id, exc)
                self.ledger.fail_job(bad.id, f"settlement refused: {exc}")
                result.failed_jobs.append(bad.id)
                continue
            except PreflightError as exc:
                self.ledger.release_batch(batch_id, str(exc))
                raise
            tx = "0x" + bytes(receipt["transactionHash"]).hex()
            self.ledger.mark_batch_settled(batch_id, tx, int(receipt["blockNumber"]))
            result.settled_batches.append(batch_id)
            if self.on_settled:
                self.on_settled(batch_id, tx)
            return
        self.ledger.release_batch(batch_id, "no settleable jobs left in the batch")

    def _find_settlement(self, batch_id: bytes) -> tuple[str | None, int | None]:
        ev = self.market.contract.events.BatchSettled
        start = self.market.client.deployment.contracts["JobMarket"].block
        logs = ev.get_logs(from_block=start, argument_filters={"batchId": batch_id})
        if not logs:
            return None, None
        return "0x" + bytes(logs[0]["transactionHash"]).hex(), int(logs[0]["blockNumber"])
