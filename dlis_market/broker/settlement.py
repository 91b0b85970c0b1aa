"""Batched on-chain settlement of completed jobs, idempotent across crashes and restarts.

One pass (:meth:`Settler.settle_once`):
1. Finish open batches first. A batch row is committed *before* its transaction is sent, so after
   a crash it is still open: if JobMarket already shows the batch id as settled, it is marked
   settled (tx found from the ``BatchSettled`` event); otherwise it is sent again. JobMarket
   refuses a used batch id and every used (client, nonce), so nothing is ever paid twice.
2. Group completed, unbatched jobs into a new batch and send it. Before a job joins a batch:
   its client's escrow must cover it (with the batch's earlier jobs of that client), or it is
   marked unpayable with the evidence (escrow at that block, what it owes) and the rest go on; a
   job one of whose stages is not routable right now (deregistered, stake below the minimum) is
   held back for later passes until ``SETTLE_DEADLINE_MARGIN_S`` before its deadline, then
   settled as it stands (JobMarket forfeits that stage's receipt). The transaction is simulated
   first; when one job is invalid (the custom error names its index) that job is marked unpayable
   with the reason and the rest are retried. So one bad job never holds up anyone else's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from eth_account.signers.local import LocalAccount

from dlis_market.broker.ledger import JobRow, Ledger
from dlis_market.chain.errors import ContractRevertError, PreflightError
from dlis_market.chain.job_market import JobAuthorization, JobMarket, Receipt, SignedJob, SignedReceipt
from dlis_market.chain.node_registry import NodeRegistry
from dlis_market.chain.typed_data import CompactSignature
from dlis_market.protocol.pricing import fee_on

log = logging.getLogger(__name__)

# A job with a stage that is not routable now is held back until this close to its deadline.
SETTLE_DEADLINE_MARGIN_S = 300


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
    failed_jobs: list[str]  # marked unpayable in this pass
    held_jobs: list[str] = field(default_factory=list)  # waiting for a stage to be routable again


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
        self.registry = NodeRegistry(market.client)

    def settle_once(self) -> SettleResult:
        result = SettleResult([], [])
        for batch in self.ledger.open_batches():
            self._finish(batch.id, result)
        now = self.market.client.timestamp()
        fee_bps = self.market.fee_bps()
        available: dict[str, int] = {}  # client -> escrow left after the jobs batched so far
        routable: dict[str, bool] = {}
        while True:
            jobs = self.ledger.unsettled_jobs(self.max_batch, exclude=result.held_jobs)
            if not jobs:
                break
            payable = []
            for job in jobs:
                if self._hold(job, now, routable):
                    result.held_jobs.append(job.id)
                elif self._covered(job, fee_bps, available):
                    payable.append(job)
                else:
                    result.failed_jobs.append(job.id)
            if payable:
                batch_id = self.ledger.create_batch([j.id for j in payable])
                self._finish(batch_id, result)
        return result

    def _hold(self, job: JobRow, now: int, routable: dict[str, bool]) -> bool:
        """Whether to keep a job for a later pass: a stage is not routable now and the deadline is
        far enough away for it to come back (a node between stake top-ups, re-registering)."""
        if job.deadline - now <= SETTLE_DEADLINE_MARGIN_S:
            return False
        for r in job.receipts:
            if r.node not in routable:
                rec = self.registry.get(r.node)
                routable[r.node] = rec is not None and rec.routable
            if not routable[r.node]:
                log.info("job %s held back: stage node %s is not routable now", job.id, r.node)
                return True
        return False

    def _covered(self, job: JobRow, fee_bps: int, available: dict[str, int]) -> bool:
        """Whether the client's escrow still covers this job after its earlier ones in this pass;
        if not, the job is marked unpayable with the figures read from the chain."""
        cost = sum(r.amount for r in job.receipts)
        owed = cost + fee_on(cost, fee_bps)
        if job.client not in available:
            available[job.client] = self.market.escrow_of(job.client, self.broker.address)
        have = available[job.client]
        if have >= owed:
            available[job.client] = have - owed
            return True
        block = self.market.client.w3.eth.block_number
        escrow = self.market.escrow_of(job.client, self.broker.address)
        pending, ready_at, expires_at = self.market.pending_withdrawal(job.client, self.broker.address)
        reason = (
            f"unpayable: client escrow does not cover the job: "
            f"JobMarket.escrowOf({job.client}, {self.broker.address}) = "
            f"{escrow} token units at block {block} ({have} left after this "
            f"pass's earlier jobs of the client), the job owes {owed} (receipts {cost} + fee at {fee_bps} bps); "
            f"pending withdrawal {pending} (ready at {ready_at}, expires at {expires_at})"
        )
        log.warning("job %s %s", job.id, reason)
        self.ledger.mark_unpayable(job.id, reason)
        return False

    def _finish(self, batch_id: str, result: SettleResult) -> None:
        bid = _b(batch_id)
        if self.market.batch_settled(self.broker.address, bid):
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
                self.ledger.mark_unpayable(bad.id, f"settlement refused: {exc}")
                result.failed_jobs.append(bad.id)
                continue
            except PreflightError as exc:
                self.ledger.release_batch(batch_id, str(exc))
                raise
            tx = "0x" + bytes(receipt["transactionHash"]).hex()
            self.ledger.mark_batch_settled(batch_id, tx, int(receipt["blockNumber"]))
            fee_bps = self.market.fee_bps()
            for f in self.market.forfeited_receipts(receipt):  # the client was charged that much less
                self.ledger.note_forfeited("0x" + f.job_id.hex(), f.node, f.amount, fee_bps)
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
