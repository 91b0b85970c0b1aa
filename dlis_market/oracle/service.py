"""The oracle process: telemetry intake, epoch closing, reputation posting, spot-check evidence.

Why one module past 400 lines: each intake (telemetry, spot check, failure, observations) and each
epoch step changes the same in-memory views under one lock and one store transaction; the pure
parts named below and the store are their own modules.

I/O lives here around the pure parts (:func:`summarize_epoch`, :func:`score_reputation`,
:func:`release_aggregates`, :func:`check_evidence`, the dropout model). One epoch is
``[k * epoch_s, (k + 1) * epoch_s)`` of unix time and is posted on chain as epoch ``k``:

1. accepted reports that *arrived* in the epoch (the oracle's clock, not the time they claim), the
   spot checks and the broker's signed job observations (:mod:`observations`) recorded in it;
2. per-node statistics (stake read from StakingManager through the node's operator);
3. reputation scores, then ``ReputationOracle.postEpoch(k, nodes, scores, root)`` where ``root``
   is the Merkle root of the epoch's leaves (:mod:`epochs`);
4. noisy network aggregates (:mod:`privacy`).

State that must survive a restart is in one transactional database (:mod:`store`, SQLite under
``state_dir`` by default, ``oracle.database_url`` otherwise), each intake in one transaction: an
accepted report with its node's seq, a check or observation with the key that makes it count once,
a slash's intent then its result with the results it yields, an epoch's intent (leaves, root, DP
inputs) before ``postEpoch`` is sent then, together, its posted status, aggregates and privacy
spend. In memory are only views of it for the epochs not yet posted, rebuilt at start after
unfinished slashes and epochs are reconciled with the chain. Which
stage calls get checked is the runner's choice (the broker's :mod:`dlis_market.broker.spot_checks`,
with a secret only it holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from web3 import Web3
from web3.exceptions import ContractCustomError

from dlis_market.chain.client import ChainClient
from dlis_market.chain.node_registry import NodeRegistry
from dlis_market.chain.reputation_oracle import ReputationOracle
from dlis_market.chain.staking_manager import StakingManager
from dlis_market.errors import ChainError
from dlis_market.oracle.dropout import DEFAULT_MODEL, HISTORY_SLOTS, DropoutModel
from dlis_market.oracle.epochs import EpochRecord, build_record
from dlis_market.oracle.errors import EvidenceRefusedError, OracleRoleMissingError
from dlis_market.oracle.privacy import Aggregates, NodeContribution, release_aggregates
from dlis_market.oracle.reputation import ReputationWeights, score_reputation, summarize_epoch
from dlis_market.oracle.slashing import Slasher, SlashResult
from dlis_market.oracle.store import EpochIntent, EpochStatus, OracleStore, database_url, default_state_dir
from dlis_market.oracle.telemetry import ReceivedTelemetry, TelemetryIntake
from dlis_market.oracle.verification import check_runner
from dlis_market.protocol.observations import ObservationBatch, StageObservation
from dlis_market.protocol.spot_checks import FingerprintCheckPass, RunnerStatement, SpotCheckEvidence, SpotCheckFailure
from dlis_market.protocol.telemetry import SignedTelemetry, oracle_domain
from dlis_market.settings import Settings

log = logging.getLogger(__name__)

UNKNOWN_EPOCH_SELECTOR = "0x" + keccak(text="ReputationOracleUnknownEpoch(uint64)")[:4].hex()


@dataclass(frozen=True)
class SpotCheckOutcome:
    outcome: Literal["pass", "slashed"]
    detail: str
    slash: SlashResult | None = None


class OracleService:
    def __init__(
        self,
        settings: Settings,
        client: ChainClient,
        account: LocalAccount,
        *,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        weights: ReputationWeights | None = None,
        dropout_model: DropoutModel = DEFAULT_MODEL,
    ) -> None:
        o = settings.oracle
        self.settings = settings
        self.config = o
        self.client = client
        self.account = account
        self.clock = clock
        self.weights = weights or ReputationWeights()
        self.dropout_model = dropout_model
        self.state_dir = default_state_dir(settings)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = OracleStore(database_url(settings))
        self.reputation = ReputationOracle(client)
        self.registry = NodeRegistry(client)
        self.staking = StakingManager(client)
        self.domain = oracle_domain(client.chain_id, self.reputation.address)
        self.intake = TelemetryIntake(
            self.domain,
            max_age_s=o.telemetry_max_age_s,
            max_skew_s=o.telemetry_max_skew_s,
            max_bytes=o.telemetry_max_bytes,
            max_decompressed_bytes=o.telemetry_max_decompressed_bytes,
            is_registered=self._registered,
            clock=clock,
            last_seq=self.store.last_seqs(),
            known=self.store.has_report,
        )
        self.accountant = self.store.accountant(o.dp_budget, o.dp_budget_window_epochs)
        # DP noise must be unpredictable in production (seed None: OS entropy); tests fix it.
        self.rng = np.random.default_rng(seed)
        market = client.deployment.contracts["JobMarket"].address
        self.slasher = Slasher(
            self.staking,
            self.registry,
            market,
            account,
            o.slash_amount,
            self.store,
            self.domain,
            o.spot_check_runners,
            o.spot_check_require_referee,
        )
        self._lock = threading.Lock()
        self._pending: list[ReceivedTelemetry] = []
        self._observed: dict[int, list[StageObservation]] = defaultdict(list)  # by epoch of arrival
        self._checks: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        self._heartbeats: dict[str, set[int]] = defaultdict(set)
        self._first_slot: dict[str, int] = {}
        self._registered_cache: dict[str, tuple[float, bool]] = {}
        self.slasher.reconcile()
        self.slashes = self.store.slash_count()
        self.posted_epochs = len(self.store.posted_epochs())
        self._reconcile_epochs()
        self._reload()

    def check_roles(self) -> None:
        """Refuse to start without the roles the loop needs (a clear message instead of a revert later)."""
        rep, stk = self.reputation.contract.functions, self.staking.contract.functions
        missing = []
        if not rep.hasRole(rep.ORACLE_ROLE().call(), self.account.address).call():
            missing.append("ORACLE_ROLE on ReputationOracle")
        if not stk.hasRole(stk.SLASHER_ROLE().call(), self.account.address).call():
            missing.append("SLASHER_ROLE on StakingManager")
        if missing:
            raise OracleRoleMissingError(
                f"account {self.account.address} lacks {' and '.join(missing)}; start the oracle with the "
                "account the deployment granted them to (--account), or have the admin grant them"
            )

    # ------------------------------------------------------------------ telemetry

    def _registered(self, node: str) -> bool:
        """NodeRegistry lookup, cached for one heartbeat interval (a report per interval per node)."""
        now = self.clock()
        hit = self._registered_cache.get(node)
        if hit is not None and now - hit[0] < self.config.heartbeat_interval_s:
            return hit[1]
        rec = self.registry.get(node)
        ok = rec is not None and rec.active
        self._registered_cache[node] = (now, ok)
        return ok

    def slot_of(self, timestamp: float) -> int:
        return int(timestamp // self.config.heartbeat_interval_s)

    def epoch_of(self, timestamp: float) -> int:
        return int(timestamp // self.config.epoch_s)

    def submit_telemetry(self, blob: bytes) -> SignedTelemetry:
        """Check and keep one report (raises :class:`TelemetryRefusedError`, counted by reason).

        It counts in the slot and epoch in which it *arrived* (this oracle's clock); the time it
        claims only has to be within ``telemetry_max_age_s`` of now to be accepted at all."""
        with self._lock:
            signed = self.intake.check(blob)
            received = ReceivedTelemetry(received_at=float(self.clock()), telemetry=signed)
            self.store.add_report(self.epoch_of(received.received_at), received)  # with its seq: one transaction
            self.intake.accept(signed)
            self.intake.drain()
            self._keep(received)
        return signed

    def uncount_refusal(self, reason: str) -> None:
        """Take back one refusal counted for ``reason``: the report was a copy of one accepted
        meanwhile (the same report relayed over the DHT after it came in over HTTP)."""
        with self._lock:  # the intake counts under this lock
            self.intake.counts[reason] -= 1

    def _keep(self, received: ReceivedTelemetry) -> None:
        node = received.telemetry.report.node
        self._pending.append(received)
        slot = self.slot_of(received.received_at)
        self._heartbeats[node].add(slot)
        self._first_slot[node] = min(self._first_slot.get(node, slot), slot)

    def _reload(self) -> None:
        """The in-memory views of the epochs not yet posted, from the database: accepted reports,
        spot-check results and observations."""
        posted = self.reputation.latest_epoch()
        for received in self.store.reports_after(posted):
            self._keep(received)
        for epoch, obs in self.store.observations_after(posted):
            self._observed[epoch].append(obs)
        for epoch, node, passed in self.store.checks_after(posted):
            self._checks[epoch][node][0 if passed else 1] += 1

    # ------------------------------------------------------------------ spot checks

    def _count_checks(self, key: str, results: list[tuple[str, bool]]) -> bool:
        """Record verification results ``(node, passed)`` in the current epoch, once per ``key``
        (results and key in one transaction). False when ``key`` was already counted."""
        epoch = self.epoch_of(self.clock())
        results = [(Web3.to_checksum_address(node), passed) for node, passed in results]
        with self._lock:
            if not self.store.count_checks(key, epoch, results):
                return False
            self._count_in_memory(epoch, results)
        return True

    def _count_in_memory(self, epoch: int, results: list[tuple[str, bool]]) -> None:
        for node, passed in results:
            self._checks[epoch][node][0 if passed else 1] += 1

    def report_spot_check(self, evidence: SpotCheckEvidence) -> SpotCheckOutcome:
        """A re-executed stage call: slash on a proven mismatch, credit both nodes on a match.

        Raises :class:`EvidenceRefusedError` (nothing slashed, nothing credited) when the evidence
        proves nothing: bad signatures, unregistered nodes, different calls, unsigned outputs.
        """
        epoch = self.epoch_of(self.clock())
        try:
            result = self.slasher.submit(evidence, epoch)
        except EvidenceRefusedError as exc:
            if exc.reason != "within_tolerance":
                raise
            # signatures, registration and output hashes were all checked before the comparison;
            # the same passed call posted again is not credited again
            call = evidence.accused_receipt
            self._count_checks(
                f"pass {evidence.accused_node.lower()} {call.job_id.lower()} {call.start}",
                [(evidence.accused_node, True), (evidence.checker_node, True)],
            )
            return SpotCheckOutcome("pass", str(exc))
        with self._lock:  # the store counted both results with the slash
            self._count_in_memory(
                epoch, [(result.accused_node, False), (Web3.to_checksum_address(evidence.checker_node), True)]
            )
            self.slashes += 1
        detail = (
            f"node {result.accused_node} differs by {result.rel_diff:.3g} (tolerance {result.tolerance:.3g}); "
            f"slashed {result.slashed} token units of operator {result.operator}"
        )
        return SpotCheckOutcome("slashed", detail, result)

    def report_failure(self, failure: SpotCheckFailure) -> bool:
        """A trusted runner says ``failure.node`` withheld what a drawn check needed: one failed
        verification for its reputation (once per node, job and range). False when already counted.

        Raises :class:`EvidenceRefusedError` (``unauthorized_runner``, nothing recorded) unless the
        statement is signed by one of the runners this oracle trusts.
        """
        self._check_runner(failure, "failure report")
        node, job, start = failure.key()
        if not self._count_checks(f"fail {node} {job} {start}", [(failure.node, False)]):
            return False
        log.warning("node %s failed a spot check of job %s [%d, %d): %s %s", failure.node, failure.job_id,
                    failure.start, failure.end, failure.reason, failure.detail)  # fmt: skip
        return True

    def report_fingerprint_pass(self, passed: FingerprintCheckPass) -> bool:
        """A trusted runner says a replica accepted ``passed.node``'s call from its signed
        fingerprint: one passed verification for ``node`` (the checker is credited nothing). A call
        is credited once however it was checked: the key is the one a re-executed pass counts
        under. False when already counted.

        Raises :class:`EvidenceRefusedError` (``unauthorized_runner``, nothing recorded) unless the
        statement is signed by one of the runners this oracle trusts.
        """
        self._check_runner(passed, "fingerprint pass")
        node, job, start = passed.key()
        return self._count_checks(f"pass {node} {job} {start}", [(passed.node, True)])

    def _check_runner(self, statement: RunnerStatement, what: str) -> None:
        """A statement names no runner: only that its signer is one this oracle trusts is checked."""
        signer = statement.runner(self.domain)
        check_runner(signer, signer or "", self.slasher.runners, what)

    # ------------------------------------------------------------------ observations

    def report_observations(self, batch: ObservationBatch) -> int:
        """The broker's signed observations of jobs' stages: what reputation scores throughput,
        latency and sessions on. Returns how many were new (each node, job and stage counts once).

        Raises :class:`EvidenceRefusedError` (nothing recorded from the batch) when any one is not
        signed by a trusted runner (``unauthorized_runner``) or was changed after signing (``tampered``).
        """
        for obs in batch.observations:
            check_runner(obs.signer(self.domain), obs.runner, self.slasher.runners, "observation")
        epoch = self.epoch_of(self.clock())
        keyed = [("observed {} {} {}".format(*obs.key()), obs) for obs in batch.observations]
        with self._lock:  # the whole batch in one transaction
            kept = self.store.add_observations(epoch, keyed)
            self._observed[epoch].extend(batch.observations[i] for i in kept)
        return len(kept)

    # ------------------------------------------------------------------ epochs

    def close_epoch(self, epoch: int) -> EpochRecord | None:
        """Score, post and store ``epoch``; ``None`` when nothing was seen in it (nothing posted).

        What is posted is recorded first (an intent: leaves, root, DP inputs); a retry, or a restart
        after a crash, posts that same root, never a second one (:meth:`_post`)."""
        status = self.store.epoch_status(epoch)
        if status == EpochStatus.POSTED:  # closed once: the stored record, nothing posted again
            return self.store.load_epoch(epoch)
        if status == EpochStatus.ABANDONED:
            return None
        intent = self.store.epoch_intent(epoch)
        if intent is None:
            built = self._build(epoch)
            if built is None:
                self._forget_before(epoch + 1)
                return None
            intent = self.store.intend_epoch(*built)
        return self._post(intent)

    def _build(self, epoch: int) -> tuple[EpochRecord, dict[str, NodeContribution]] | None:
        """The record and the per-node DP inputs of ``epoch`` from what was seen in it."""
        o = self.config
        start = epoch * o.epoch_s
        end = start + o.epoch_s
        with self._lock:  # read only: if posting fails, everything stays for the retry
            reports = [r for r in self._pending if start <= r.received_at < end]
            checks = {n: (c[0], c[1]) for n, c in self._checks.get(epoch, {}).items()}
            observed = list(self._observed.get(epoch, ()))
        nodes = {r.telemetry.report.node for r in reports} | set(checks)
        nodes |= {Web3.to_checksum_address(o.node) for o in observed}
        if not nodes:
            return None
        stakes: dict[str, tuple[int, int]] = {}
        for node in nodes:
            rec = self.registry.get(node)
            if rec is not None:
                info = self.staking.info(rec.operator)
                stakes[node] = (info.active, info.min_stake)
        stats = summarize_epoch(reports, start, o.epoch_s, o.heartbeat_interval_s, checks, stakes, observed)
        scores = score_reputation(stats, self.weights)
        by_node: dict[str, list[SignedTelemetry]] = defaultdict(list)
        for r in reports:
            by_node[r.telemetry.report.node].append(r.telemetry)
        digests = {
            n: [r.digest(self.domain) for r in sorted(rs, key=lambda r: r.report.seq)] for n, rs in by_node.items()
        }
        contributions = {
            n: NodeContribution(
                uptime_fraction=stats[n].uptime_fraction,
                measured_tps=stats[n].reported_tps,
                latencies_ms=tuple(x for r in rs for x in r.report.metrics.latencies_ms),
            )
            for n, rs in by_node.items()
        }
        return build_record(epoch, scores, digests), contributions

    def _post(self, intent: EpochIntent) -> EpochRecord | None:
        """Put a recorded epoch on chain unless the chain already holds its root, then record, in
        one transaction, that it is posted, its aggregates and the privacy budget they spend.
        ``None`` (and the intent abandoned) when the chain holds another root for the epoch."""
        record = intent.record
        epoch, root = record.epoch, bytes.fromhex(record.root[2:])
        on_chain = self._root_on_chain(epoch)
        if on_chain == root:
            log.info("epoch %d is on chain already (posted before a crash): finishing it", epoch)
        elif on_chain is not None or self.reputation.latest_epoch() > epoch:
            log.error("epoch %d cannot be posted: the chain holds root %s for it and is at epoch %d; abandoned",
                      epoch, on_chain and "0x" + on_chain.hex(), self.reputation.latest_epoch())  # fmt: skip
            self.store.abandon_epoch(epoch)
            self._forget_before(epoch + 1)
            return None
        else:
            nodes = [leaf.node for leaf in record.leaves]
            scores = [leaf.score_bps for leaf in record.leaves]
            receipt = self.reputation.post_epoch(self.account, epoch, nodes, scores, root)
            record = record.model_copy(update={"tx": "0x" + bytes(receipt["transactionHash"]).hex()})
        o = self.config
        accountant = copy.deepcopy(self.accountant)  # charged for real only when the transaction commits
        agg = release_aggregates(
            epoch, intent.contributions, o.dp_epsilon, o.dp_capacity_clip_tps, accountant, self.rng
        )
        self.store.finish_epoch(record, agg, accountant)
        self.accountant = accountant
        self.posted_epochs += 1
        self._forget_before(epoch + 1)
        log.info("posted epoch %d: %d nodes, root %s", epoch, len(record.leaves), record.root)
        return record

    def _root_on_chain(self, epoch: int) -> bytes | None:
        """The root posted for ``epoch``; None when it was not posted."""
        try:
            return self.reputation.telemetry_root(epoch)
        except ContractCustomError as exc:  # epochInfo reverts for an epoch never posted: that is the answer
            if str(exc.data).startswith(UNKNOWN_EPOCH_SELECTOR):
                return None
            raise

    def _reconcile_epochs(self) -> None:
        """Finish the epochs a crash left recorded but not finished (at start)."""
        for intent in self.store.open_epochs():
            try:
                self._post(intent)
            except ChainError as exc:  # unreachable chain or a revert: the loop retries the epoch
                log.error("epoch %d not finished at start: %s", intent.record.epoch, exc)

    def _forget_before(self, epoch: int) -> None:
        """Drop what closed epochs no longer need; keep one history window of heartbeats."""
        end = epoch * self.config.epoch_s
        with self._lock:
            self._pending = [r for r in self._pending if r.received_at >= end]
            for old in [e for e in self._checks if e < epoch]:
                del self._checks[old]
            for old in [e for e in self._observed if e < epoch]:
                del self._observed[old]
            horizon = self.slot_of(end) - HISTORY_SLOTS
            for slots in self._heartbeats.values():
                slots.difference_update([s for s in slots if s < horizon])

    def latest_aggregates(self) -> Aggregates | None:
        return self.store.aggregates()

    def aggregates_of(self, epoch: int) -> Aggregates | None:
        return self.store.aggregates(epoch)

    # ------------------------------------------------------------------ failure risk

    def heartbeat_record(self, node: str, now: float | None = None) -> list[int]:
        """1/0 per slot from the node's first report to the last complete slot before ``now`` (or
        the current slot once the node reported in it)."""
        node = Web3.to_checksum_address(node)
        with self._lock:
            seen = set(self._heartbeats.get(node, ()))
            first = self._first_slot.get(node)
        if first is None:
            return []
        current = self.slot_of(self.clock() if now is None else now)
        last = current if current in seen else current - 1  # the current slot counts once reported
        lo = max(first, last - HISTORY_SLOTS + 1)
        return [1 if s in seen else 0 for s in range(lo, last + 1)]

    def failure_risk(self, node: str, now: float | None = None) -> float:
        """Probability that ``node`` drops out within the next window (the scheduler's failure_risk).

        A node that missed the last two slots is already gone: 1.0. A node never heard from gets
        the model's prediction for an empty record.
        """
        record = self.heartbeat_record(node, now)
        if len(record) >= 2 and not any(record[-2:]):
            return 1.0
        return self.dropout_model.predict(record)

    def failure_risks(self, now: float | None = None) -> dict[str, float]:
        with self._lock:
            nodes = sorted(self._heartbeats)
        return {n: self.failure_risk(n, now) for n in nodes}

    def scheduler_view(self, now: float | None = None) -> dict[str, dict[str, float | int]]:
        """What the broker's scheduler reads per node: ``reputation_bps`` (latest posted epoch, as on
        chain), ``reputation_epoch`` and ``failure_risk`` (``NodeOffer`` fields of the same names)."""
        latest: dict[str, tuple[int, int]] = {}
        stored = self.store.posted_epochs()
        if stored:
            record = self.store.load_epoch(stored[-1])
            latest = {leaf.node: (leaf.score_bps, record.epoch) for leaf in record.leaves}
        risks = self.failure_risks(now)
        out: dict[str, dict[str, float | int]] = {}
        for node in sorted(set(latest) | set(risks)):
            score, epoch = latest.get(node, (0, 0))
            risk = risks[node] if node in risks else self.failure_risk(node, now)
            out[node] = {"reputation_bps": score, "reputation_epoch": epoch, "failure_risk": risk}
        return out

    # ------------------------------------------------------------------ loop

    async def run(self, stop: asyncio.Event) -> None:
        """Close each epoch once its reports can no longer arrive, until ``stop``.

        A report of epoch k is stale ``telemetry_max_age_s`` after the epoch ends, so closing then
        loses nothing that the intake would still accept.
        """
        closed = await asyncio.to_thread(self.reputation.latest_epoch)
        while not stop.is_set():
            now = self.clock()
            due = self.epoch_of(now - self.config.telemetry_max_age_s) - 1
            if due > closed:
                try:
                    await asyncio.to_thread(self.close_due, closed, due)
                except Exception:  # keep serving telemetry; the next pass retries (logged with traceback)
                    log.exception("closing the epochs up to %d failed; retrying next pass", due)
                else:
                    closed = due
            next_close = (self.epoch_of(now) + 1) * self.config.epoch_s + self.config.telemetry_max_age_s
            with contextlib.suppress(TimeoutError):  # the timeout is the normal wake-up
                await asyncio.wait_for(stop.wait(), timeout=max(1.0, min(60.0, next_close - now)))

    def close_due(self, after: int, due: int) -> None:
        """Finish the epochs recorded but not finished, then close, in order, every epoch in
        ``(after, due]`` in which something arrived: none is skipped when the loop wakes late or the
        oracle was down for a while (a retry posts a recorded intent, or only finishes it)."""
        for intent in self.store.open_epochs():
            self._post(intent)
        for epoch in self.store.epochs_with_data(after, due):
            self.close_epoch(epoch)
        self._forget_before(due + 1)
