"""Batched on-chain settlement of completed jobs, idempotent across crashes and restarts.

Three paths: Merkle (``JobMarket.settleBatchMerkle``, ~23k gas per 3-stage job in a batch of 50):
each node of the batch is asked, all at once through the :class:`BatchSigner`, to sign one
``BatchReceipt`` over the Merkle root of its receipts in the batch; per receipt
(``settleBatch``, ~40k gas per job): every stage's own receipt signature; and one job alone
(``settleJob``, ~120k gas, the least for a single job): its stages' own receipt signatures too, so
no node is asked anything. Jobs whose every node signed go Merkle; the jobs of a node that did not
answer in time, refused, or signed something else move to a batch of their own, settled per
receipt in the same pass. Whenever exactly one job is left to send (a batch of one, a split-off or
what remains after refused jobs), it goes through ``settleJob`` unless a stage bills 2**128 units
or more (then ``settleBatch``).

One pass (:meth:`Settler.settle_once`):
1. Finish open batches first. A batch row is committed *before* its transaction is sent, so after
   a crash it is still open: if JobMarket already shows it settled (for a batch of one job, which
   ``settleJob`` settles without recording a batch id or emitting ``BatchSettled``: the job's
   ``JobSettled`` event in a transaction from this broker; ``batchSettled`` for the per-receipt
   path; for the Merkle path, which records no batch id, its first job's nonce used and a
   ``BatchSettled`` event of this broker with the batch id), it is marked settled with that
   transaction (and what it forfeited); otherwise it is sent again. JobMarket refuses a used
   per-receipt batch id and every used (client, nonce), so nothing is ever paid twice.
2. Group completed, unbatched jobs into a new batch and send it. Before a job joins a batch:
   its client's escrow must cover it (with the batch's earlier jobs of that client), or it is
   marked unpayable with the evidence (escrow at that block, what it owes) and the rest go on; a
   job one of whose stages is not routable right now (deregistered, stake below the minimum) is
   held back for later passes until ``SETTLE_DEADLINE_MARGIN_S`` before its deadline, then
   settled as it stands (JobMarket forfeits that stage's receipt). The transaction is simulated
   first; when one job is invalid (the custom error names its index) that job is marked unpayable
   with the reason and the rest are retried (a Merkle batch asks again only the nodes whose leaves
   changed); when the contract refuses a node's batch receipt (the error names the node index),
   that node's jobs go per receipt. So one bad job or node never holds up anyone else's.

Several broker processes on one PostgreSQL ledger settle through one of them at a time, the
holder of the settler lease (:mod:`.cluster`; ``lease``): a survivor that takes the lease over
finishes a dead settler's open batches by step 1.

Why one module of this size: the two settlement paths share one pass (grouping, escrow coverage,
holding back unroutable stages, simulating first, per-job refusals, crash recovery of open
batches); the chain calls are :mod:`dlis_market.chain.job_market`, the rows :mod:`.ledger`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from eth_account.signers.local import LocalAccount
from eth_typing import HexStr
from web3 import Web3
from web3.types import TxReceipt

from dlis_market.broker.backend import BatchSigner, BatchSigningRequest
from dlis_market.broker.ledger import JobRow, Ledger
from dlis_market.chain.errors import ContractRevertError, PreflightError
from dlis_market.chain.job_market import (
    BatchReceipt,
    JobAuthorization,
    JobMarket,
    MerkleJob,
    SignedBatchReceipt,
    SignedJob,
    SignedReceipt,
    batch_receipts,
)
from dlis_market.chain.node_registry import NodeRegistry
from dlis_market.chain.typed_data import CompactSignature, recover_typed
from dlis_market.protocol.pricing import fee_on

log = logging.getLogger(__name__)

# A job with a stage that is not routable now is held back until this close to its deadline.
SETTLE_DEADLINE_MARGIN_S = 300
# A node that signed no batch receipt (no answer in time, a refusal, a bad signature) is not asked
# again for this long: meanwhile its jobs settle per receipt without waiting on it.
UNSIGNED_RETRY_S = 60.0


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
    receipts = [r.signed(_b(row.id), _b(row.model_id)) for r in row.receipts]
    return SignedJob(auth, CompactSignature.from_bytes(_b(row.auth_signature)), receipts)


def merkle_job(row: JobRow, job: SignedJob) -> MerkleJob:
    """The job for ``settleBatchMerkle``: each stage with the node the ledger recorded for it (the
    signer of its receipt, checked when the receipt came in)."""
    stages = [(Web3.to_checksum_address(r.node), s.receipt) for r, s in zip(row.receipts, job.receipts, strict=True)]
    return MerkleJob(job.authorization, job.signature, tuple(stages))


@dataclass
class SettleResult:
    settled_batches: list[str]
    failed_jobs: list[str]  # marked unpayable in this pass
    held_jobs: list[str] = field(default_factory=list)  # waiting for a stage to be routable again
    merkle_batches: list[str] = field(default_factory=list)  # of settled_batches, those settled by Merkle root
    solo_batches: list[str] = field(default_factory=list)  # of settled_batches, one job alone by settleJob
    # node -> why it signed no batch receipt this pass (its jobs settled per receipt)
    unsigned_nodes: dict[str, str] = field(default_factory=dict)


class Settler:
    def __init__(
        self,
        ledger: Ledger,
        market: JobMarket,
        broker: LocalAccount,
        max_batch: int = 50,
        on_settled: Callable[[str, str | None], None] | None = None,
        signer: BatchSigner | None = None,
        lease: Callable[[], bool] | None = None,
    ):
        self.ledger = ledger
        self.market = market
        self.broker = broker
        self.max_batch = max_batch
        self.on_settled = on_settled
        # Merkle settlement's node-signing step; None: every batch settles per receipt
        self.signer = signer
        self._unsigned: dict[str, tuple[float, str]] = {}  # node -> (ask again after, why) (monotonic)
        self.registry = NodeRegistry(market.client)
        # Whether this process is the one that settles now (several broker processes on one
        # ledger elect one, broker/cluster.py); None: it always is.
        self.lease = lease

    def _settling(self) -> bool:
        return self.lease is None or self.lease()

    def settle_once(self) -> SettleResult:
        """One pass (module docstring); nothing while another process holds the settler lease."""
        result = SettleResult([], [])
        if not self._settling():
            return result
        for batch in self.ledger.open_batches():
            self._finish(batch.id, result)
        now = self.market.client.timestamp()
        fee_bps = self.market.fee_bps()
        available: dict[str, int] = {}  # client -> escrow left after the jobs batched so far
        routable: dict[str, bool] = {}
        while self._settling():  # a lease lost mid-pass: the new settler finishes what this one opened
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

    def _finish(self, batch_id: str, result: SettleResult, merkle: bool = True) -> None:
        bid = _b(batch_id)
        jobs = self.ledger.batch_jobs(batch_id)
        found = self._on_chain_settlement(bid, jobs)
        if found is not None:  # sent before a crash: record it (and what it forfeited)
            tx, block = found
            receipt = self.market.client.w3.eth.get_transaction_receipt(HexStr(tx)) if tx else None
            self._record(batch_id, tx, block, receipt, result)
            return
        if merkle and self.signer is not None and jobs:
            splits: list[str] = []  # batches split off; on an exception they stay open for the next pass
            jobs = self._settle_merkle(self.signer, batch_id, jobs, result, splits)
            for split in splits:
                self._finish(split, result, merkle=False)
            if not jobs:
                return
        self._settle_receipts(batch_id, jobs, result)

    def _on_chain_settlement(self, batch_id: bytes, jobs: list[JobRow]) -> tuple[str | None, int | None] | None:
        """(tx, block) of this broker's settlement of the batch if it already landed, else None:
        for one job (``settleJob`` records no batch id), its ``JobSettled`` event sent by this
        broker; ``batchSettled`` (per-receipt path); or (Merkle path, no batch id on chain) its
        first job's nonce is used and a ``BatchSettled`` event of this broker names the batch id.
        A nonce used by another settlement (a client that signed the nonce twice) is not ours: the
        simulation then refuses that job by name."""
        if len(jobs) == 1:
            found = self._find_job_settlement(jobs[0])
            if found is not None:
                return found
        if self.market.batch_settled(self.broker.address, batch_id):
            return self._find_settlement(batch_id)
        if not jobs or not self.market.nonce_used(Web3.to_checksum_address(jobs[0].client), jobs[0].nonce):
            return None
        tx, block = self._find_settlement(batch_id)
        return None if tx is None else (tx, block)

    def _record(
        self, batch_id: str, tx: str | None, block: int | None, receipt: TxReceipt | None, result: SettleResult
    ) -> None:
        self.ledger.mark_batch_settled(batch_id, tx, block)
        if receipt is not None:
            fee_bps = self.market.fee_bps()
            for f in self.market.forfeited_receipts(receipt):  # the client was charged that much less
                self.ledger.note_forfeited("0x" + f.job_id.hex(), f.node, f.amount, fee_bps)
        result.settled_batches.append(batch_id)
        if self.on_settled:
            self.on_settled(batch_id, tx)

    def _drop(self, batch_id: str, jobs: list[JobRow], index: int, exc: Exception, result: SettleResult) -> None:
        bad = jobs.pop(index)
        log.warning("job %s cannot settle and is dropped from batch %s: %s", bad.id, batch_id, exc)
        self.ledger.mark_unpayable(bad.id, f"settlement refused: {exc}")
        result.failed_jobs.append(bad.id)

    def _settle_receipts(self, batch_id: str, jobs: list[JobRow], result: SettleResult) -> None:
        """Per-receipt path, every stage's own signature: ``settleBatch``, or ``settleJob`` when one
        job is left (its stages fit the packed word)."""
        bid = _b(batch_id)
        while jobs:
            self.ledger.note_attempt(batch_id)
            solo = len(jobs) == 1 and self._packable(jobs[0])
            try:
                if solo:
                    receipt = self.market.settle_job(self.broker, signed_job(jobs[0], self.broker.address))
                else:
                    built = [signed_job(j, self.broker.address) for j in jobs]
                    receipt = self.market.settle_batch(self.broker, bid, built)
            except ContractRevertError as exc:
                if exc.error == "JobMarketBatchAlreadySettled":
                    tx, block = self._find_settlement(bid)
                    self._record(batch_id, tx, block, None, result)
                    return
                index = exc.error_args.get("jobIndex")
                if not isinstance(index, int) or index >= len(jobs):
                    self.ledger.release_batch(batch_id, str(exc))
                    raise
                self._drop(batch_id, jobs, index, exc, result)
                continue
            except PreflightError as exc:
                self.ledger.release_batch(batch_id, str(exc))
                raise
            tx = "0x" + bytes(receipt["transactionHash"]).hex()
            if solo:
                log.info("batch %s: job %s settled alone by settleJob, tx %s", batch_id, jobs[0].id, tx)
                result.solo_batches.append(batch_id)
            self._record(batch_id, tx, int(receipt["blockNumber"]), receipt, result)
            return
        self.ledger.release_batch(batch_id, "no settleable jobs left in the batch")

    def _settle_merkle(
        self, signer: BatchSigner, batch_id: str, jobs: list[JobRow], result: SettleResult, splits: list[str]
    ) -> list[JobRow]:
        """Merkle path: settle the jobs whose every node signs its batch receipt; the others move to
        batches of their own (appended to ``splits``, for the per-receipt path). Returns the jobs
        left in ``batch_id`` for the per-receipt path: all of them when no node signed, the one
        job left alone (``settleJob`` needs no batch receipt), else none."""
        bid = _b(batch_id)
        built = {j.id: signed_job(j, self.broker.address) for j in jobs}
        signed: dict[BatchReceipt, SignedBatchReceipt] = {}  # kept across retries: unchanged roots are not re-asked
        left_out = result.unsigned_nodes  # node -> why it is not in a Merkle batch (this pass)
        now = time.monotonic()
        for node, (until, why) in self._unsigned.items():  # recently unsigned: not waited on again
            if until > now:
                left_out.setdefault(node, f"{why} (not asked again for {until - now:.0f} s)")
        while jobs:
            if len(jobs) == 1:
                return jobs  # one job alone: settleJob on its receipts' own signatures, cheaper
            mjobs = [j for j in jobs if self._merkle_eligible(j, left_out)]
            if not mjobs:
                return jobs  # no node signed: the whole batch per receipt, under its own id
            rows = {j.id: merkle_job(j, built[j.id]) for j in mjobs}
            expected = batch_receipts(self.broker.address, bid, [rows[j.id] for j in mjobs])
            missing = [n for n, r in expected.items() if r not in signed]
            ask = len(mjobs) > 1 and missing  # one job would go alone (settleJob): no batch receipt to ask for
            if ask and self._collect(signer, bid, expected, missing, mjobs, built, signed, left_out):
                continue  # a node gave no valid signature: its jobs leave, the others' roots change
            if len(mjobs) < len(jobs):
                rest = [j for j in jobs if j not in mjobs]
                split = self.ledger.create_batch([j.id for j in rest])  # committed: moves them out
                log.info(
                    "batch %s: %d job(s) with a stage on a node that signed no batch receipt (%s) settle per "
                    "receipt in batch %s",
                    batch_id, len(rest), "; ".join(f"{n}: {w}" for n, w in left_out.items()), split,
                )  # fmt: skip
                splits.append(split)
                jobs = mjobs
                if len(jobs) == 1:
                    return jobs  # alone now: settleJob, no batch receipt needed
            self.ledger.note_attempt(batch_id)
            try:
                receipt = self.market.settle_batch_merkle(
                    self.broker, bid, [rows[j.id] for j in jobs], {n: signed[r] for n, r in expected.items()}
                )
            except ContractRevertError as exc:
                index = exc.error_args.get("jobIndex")
                node_index = exc.error_args.get("nodeIndex")
                if isinstance(index, int) and index < len(jobs):
                    self._drop(batch_id, jobs, index, exc, result)
                    continue
                if isinstance(node_index, int) and node_index < len(expected):
                    node = list(expected)[node_index]
                    left_out[node] = f"JobMarket refused its batch receipt: {exc}"
                    self._unsigned.setdefault(node, (time.monotonic() + UNSIGNED_RETRY_S, left_out[node]))
                    log.warning("batch %s: %s", batch_id, left_out[node])
                    continue
                self.ledger.release_batch(batch_id, str(exc))
                raise
            except PreflightError as exc:
                self.ledger.release_batch(batch_id, str(exc))
                raise
            tx = "0x" + bytes(receipt["transactionHash"]).hex()
            log.info(
                "batch %s settled by Merkle root: %d jobs, %d nodes, tx %s", batch_id, len(jobs), len(expected), tx
            )
            result.merkle_batches.append(batch_id)
            self._record(batch_id, tx, int(receipt["blockNumber"]), receipt, result)
            return []
        self.ledger.release_batch(batch_id, "no settleable jobs left in the batch")
        return []

    @staticmethod
    def _packable(job: JobRow) -> bool:
        """Every stage's amount fits a packed stage word (``settleJob``, ``settleBatchMerkle``)."""
        return bool(job.receipts) and all(r.amount < 2**128 for r in job.receipts)

    @classmethod
    def _merkle_eligible(cls, job: JobRow, left_out: dict[str, str]) -> bool:
        """Every stage's node signs (so far) and every amount fits a packed Merkle stage."""
        return cls._packable(job) and all(Web3.to_checksum_address(r.node) not in left_out for r in job.receipts)

    def _collect(
        self,
        signer: BatchSigner,
        batch_id: bytes,
        expected: dict[str, BatchReceipt],
        nodes: list[str],
        jobs: list[JobRow],
        built: dict[str, SignedJob],
        signed: dict[BatchReceipt, SignedBatchReceipt],
        left_out: dict[str, str],
    ) -> bool:
        """Ask ``nodes`` (all at once) to sign their ``expected`` batch receipts; keep each valid
        signature in ``signed``, note the others in ``left_out``. Whether any node was left out."""
        mine: dict[str, list[SignedReceipt]] = {n: [] for n in nodes}
        for job in jobs:
            for row, stage in zip(job.receipts, built[job.id].receipts, strict=True):
                node: str = Web3.to_checksum_address(row.node)
                if node in mine:
                    mine[node].append(stage)
        requests: list[BatchSigningRequest] = []
        gone: dict[str, str] = {}
        now = time.monotonic()
        for node in [n for n, (until, _) in self._unsigned.items() if until <= now]:
            del self._unsigned[node]  # ask it again
        for node in nodes:
            if node in self._unsigned:
                until, why = self._unsigned[node]
                gone[node] = f"{why} (not asked again for {until - now:.0f} s)"
                continue
            rec = self.registry.get(node)
            if rec is None:  # JobMarket refuses an unregistered node in a Merkle batch
                gone[node] = "not registered on NodeRegistry"
            else:
                requests.append(BatchSigningRequest(node, rec.peer_id or None, mine[node]))
        answers = signer.sign_batches(self.broker.address, batch_id, requests) if requests else None
        domain = self.market.domain()
        for req in requests:
            sig = answers.signatures.get(req.node) if answers else None
            if sig is None:
                gone[req.node] = answers.refusals.get(req.node, "no answer") if answers else "not asked"
                continue
            want = expected[req.node]
            try:
                who = recover_typed(domain, "BatchReceipt", want.message(), sig)
                ok = who.lower() == req.node.lower()
            except (ValueError, TypeError) as exc:  # not a signature at all
                who, ok = f"nothing ({exc})", False
            if not ok:
                gone[req.node] = (
                    f"its batch signature recovers to {who}, not to the node, over root 0x{want.root.hex()[:16]}.. "
                    f"total {want.total} count {want.count}: it signed other receipts than the batch's"
                )
                continue
            signed[want] = SignedBatchReceipt(want, CompactSignature.from_bytes(sig))
        for node, why in gone.items():
            log.info("node %s signed no batch receipt for batch 0x%s: %s", node, batch_id.hex()[:16], why)
            self._unsigned.setdefault(node, (now + UNSIGNED_RETRY_S, why))
        left_out.update(gone)
        return bool(gone)

    def _find_job_settlement(self, job: JobRow) -> tuple[str, int] | None:
        """(tx, block) of the ``JobSettled`` event of ``job`` in a transaction this broker sent,
        once its nonce is used (the check that costs no log scan)."""
        if not self.market.nonce_used(Web3.to_checksum_address(job.client), job.nonce):
            return None
        w3 = self.market.client.w3
        start = self.market.client.deployment.contracts["JobMarket"].block
        logs = self.market.contract.events.JobSettled.get_logs(from_block=start, argument_filters={"jobId": _b(job.id)})
        for ev in logs:
            if w3.eth.get_transaction(ev["transactionHash"])["from"].lower() == self.broker.address.lower():
                return "0x" + bytes(ev["transactionHash"]).hex(), int(ev["blockNumber"])
        return None

    def _find_settlement(self, batch_id: bytes) -> tuple[str | None, int | None]:
        """The transaction and block of this broker's ``BatchSettled`` event with ``batch_id``."""
        ev = self.market.contract.events.BatchSettled
        start = self.market.client.deployment.contracts["JobMarket"].block
        logs = ev.get_logs(from_block=start, argument_filters={"batchId": batch_id, "broker": self.broker.address})
        if not logs:
            return None, None
        return "0x" + bytes(logs[0]["transactionHash"]).hex(), int(logs[0]["blockNumber"])
