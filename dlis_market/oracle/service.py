"""The oracle process: telemetry intake, epoch closing, reputation posting, spot-check evidence.

I/O lives here around the pure parts (:func:`summarize_epoch`, :func:`score_reputation`,
:func:`release_aggregates`, :func:`check_evidence`, the dropout model). One epoch is
``[k * epoch_s, (k + 1) * epoch_s)`` of unix time and is posted on chain as epoch ``k``:

1. accepted reports that *arrived* in the epoch (the oracle's clock, not the time they claim), the
   spot checks and the broker's signed job observations (:mod:`observations`) recorded in it;
2. per-node statistics (stake read from StakingManager through the node's operator);
3. reputation scores, then ``ReputationOracle.postEpoch(k, nodes, scores, root)`` where ``root``
   is the Merkle root of the epoch's leaves (:mod:`epochs`), stored under ``state_dir/epochs``;
4. noisy network aggregates (:mod:`privacy`), stored under ``state_dir/aggregates``.

State that must survive a restart is on disk under ``state_dir``: the highest accepted seq of
each node (``seqs.log``, so replays stay refused), every accepted report (``reports/<epoch>.jsonl``,
reloaded for epochs not yet posted), the privacy accounts, the posted epochs (leaves for proofs),
the aggregates, the evidence of every slash, the spot-check results of epochs not yet posted
(``checks/<epoch>.log``), the observations of epochs not yet posted (``observations/<epoch>.jsonl``)
and which checks and observations were already counted (``counted_checks.log``), all written
crash-safe (:mod:`state_files`). Which
stage calls get checked is the runner's choice (the broker's :mod:`dlis_market.broker.spot_checks`,
with a secret only it holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from eth_account.signers.local import LocalAccount
from web3 import Web3

from dlis_market.chain.client import ChainClient
from dlis_market.chain.node_registry import NodeRegistry
from dlis_market.chain.reputation_oracle import ReputationOracle
from dlis_market.chain.staking_manager import StakingManager
from dlis_market.oracle.dropout import DEFAULT_MODEL, HISTORY_SLOTS, DropoutModel
from dlis_market.oracle.epochs import EpochRecord, EpochStore, build_record
from dlis_market.oracle.errors import EvidenceRefusedError, OracleRoleMissingError
from dlis_market.oracle.observations import ObservationBatch, StageObservation
from dlis_market.oracle.privacy import Aggregates, BudgetAccountant, NodeContribution, release_aggregates
from dlis_market.oracle.reputation import ReputationWeights, score_reputation, summarize_epoch
from dlis_market.oracle.slashing import Slasher, SlashResult
from dlis_market.oracle.state_files import append_line, complete_lines, remove_leftovers, write_atomic
from dlis_market.oracle.telemetry import ReceivedTelemetry, SignedTelemetry, TelemetryIntake, oracle_domain
from dlis_market.oracle.verification import SpotCheckEvidence, SpotCheckFailure, check_runner
from dlis_market.settings import Settings

log = logging.getLogger(__name__)


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
        self.state_dir = o.state_dir or settings.home / "oracle"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.state_dir, self.state_dir / "epochs", self.state_dir / "aggregates"):
            remove_leftovers(folder)  # temporary files of writes a crash interrupted
        self.reputation = ReputationOracle(client)
        self.registry = NodeRegistry(client)
        self.staking = StakingManager(client)
        self.domain = oracle_domain(client.chain_id, self.reputation.address)
        self.epochs = EpochStore(self.state_dir / "epochs")
        self._seq_log = self.state_dir / "seqs.log"
        self.intake = TelemetryIntake(
            self.domain,
            max_age_s=o.telemetry_max_age_s,
            max_skew_s=o.telemetry_max_skew_s,
            max_bytes=o.telemetry_max_bytes,
            max_decompressed_bytes=o.telemetry_max_decompressed_bytes,
            is_registered=self._registered,
            clock=clock,
            last_seq=self._load_seqs(),
        )
        budget_file = self.state_dir / "privacy.json"
        self.accountant = (
            BudgetAccountant.from_json(budget_file.read_text())
            if budget_file.exists()
            else BudgetAccountant(o.dp_budget, o.dp_budget_window_epochs)
        )
        # DP noise must be unpredictable in production (seed None: OS entropy); tests fix it.
        self.rng = np.random.default_rng(seed)
        market = client.deployment.contracts["JobMarket"].address
        evidence_dir = self.state_dir / "evidence"
        self.slasher = Slasher(
            self.staking,
            self.registry,
            market,
            account,
            o.slash_amount,
            evidence_dir,
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
        # checks already counted (a pass or a failure per node, job and range): posted again, they
        # are not counted again, across restarts too (digests, one per line)
        self._counted_log = self.state_dir / "counted_checks.log"
        self._counted = set(complete_lines(self._counted_log))
        self.aggregates: dict[int, Aggregates] = {}
        self.slashes = 0
        self.posted_epochs = 0
        self._reports_dir = self.state_dir / "reports"
        self._checks_dir = self.state_dir / "checks"
        self._observations_dir = self.state_dir / "observations"
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

    def _load_seqs(self) -> dict[str, int]:
        seqs: dict[str, int] = {}
        for line in complete_lines(self._seq_log):
            node, _, seq = line.partition(" ")
            if seq.isdigit():
                seqs[node] = max(seqs.get(node, -1), int(seq))
        return seqs

    def slot_of(self, timestamp: float) -> int:
        return int(timestamp // self.config.heartbeat_interval_s)

    def epoch_of(self, timestamp: float) -> int:
        return int(timestamp // self.config.epoch_s)

    def submit_telemetry(self, blob: bytes) -> SignedTelemetry:
        """Check and keep one report (raises :class:`TelemetryRefusedError`, counted by reason).

        It counts in the slot and epoch in which it *arrived* (this oracle's clock); the time it
        claims only has to be within ``telemetry_max_age_s`` of now to be accepted at all."""
        with self._lock:
            signed = self.intake.submit(blob)
            report = signed.report
            received = ReceivedTelemetry(received_at=float(self.clock()), telemetry=signed)
            append_line(self._seq_log, f"{report.node} {report.seq}")
            append_line(self._reports_dir / f"{self.epoch_of(received.received_at)}.jsonl", received.model_dump_json())
            self.intake.drain()
            self._keep(received)
        return signed

    def _keep(self, received: ReceivedTelemetry) -> None:
        node = received.telemetry.report.node
        self._pending.append(received)
        slot = self.slot_of(received.received_at)
        self._heartbeats[node].add(slot)
        self._first_slot[node] = min(self._first_slot.get(node, slot), slot)

    def _reload(self) -> None:
        """What epochs not yet posted had survives a restart: accepted reports
        (``reports/<epoch>.jsonl``) and spot-check results (``checks/<epoch>.log``)."""
        posted = self.reputation.latest_epoch()
        for _epoch, line in self._unposted_lines(self._reports_dir, "jsonl", posted):
            if line.strip():
                self._keep(self._received(line))
        for epoch, line in self._unposted_lines(self._observations_dir, "jsonl", posted):
            if line.strip():
                self._observed[epoch].append(StageObservation.model_validate_json(line))
        for epoch, line in self._unposted_lines(self._checks_dir, "log", posted):
            node, _, outcome = line.partition(" ")
            if Web3.is_address(node) and outcome in ("pass", "fail"):
                self._checks[epoch][Web3.to_checksum_address(node)][0 if outcome == "pass" else 1] += 1

    @staticmethod
    def _received(line: str) -> ReceivedTelemetry:
        """A stored report line; lines written before arrival times were kept hold the bare report
        (their claimed time stands in for the arrival, as it did then)."""
        if line.startswith('{"received_at"'):
            return ReceivedTelemetry.model_validate_json(line)
        signed = SignedTelemetry.model_validate_json(line)
        return ReceivedTelemetry(received_at=float(signed.report.timestamp), telemetry=signed)

    @staticmethod
    def _unposted_lines(folder: Path, suffix: str, posted: int) -> Iterator[tuple[int, str]]:
        """``(epoch, line)`` of every ``<epoch>.<suffix>`` file in ``folder`` for epochs after ``posted``."""
        if not folder.exists():
            return
        for path in sorted(folder.glob(f"*.{suffix}")):
            if path.stem.isdigit() and int(path.stem) > posted:
                for line in complete_lines(path):
                    yield int(path.stem), line

    # ------------------------------------------------------------------ spot checks

    def record_check(self, node: str, passed: bool, at: float | None = None) -> None:
        """Count a verification result in the current epoch (kept in ``checks/<epoch>.log`` until posted)."""
        epoch = self.epoch_of(self.clock() if at is None else at)
        node = Web3.to_checksum_address(node)
        with self._lock:
            self._checks[epoch][node][0 if passed else 1] += 1
            append_line(self._checks_dir / f"{epoch}.log", f"{node} {'pass' if passed else 'fail'}")

    def report_spot_check(self, evidence: SpotCheckEvidence) -> SpotCheckOutcome:
        """A re-executed stage call: slash on a proven mismatch, credit both nodes on a match.

        Raises :class:`EvidenceRefusedError` (nothing slashed, nothing credited) when the evidence
        proves nothing: bad signatures, unregistered nodes, different calls, unsigned outputs.
        """
        try:
            result = self.slasher.submit(evidence)
        except EvidenceRefusedError as exc:
            if exc.reason != "within_tolerance":
                raise
            # signatures, registration and output hashes were all checked before the comparison;
            # the same passed call posted again is not credited again
            call = evidence.accused_receipt
            if self._count_once(f"pass {evidence.accused_node.lower()} {call.job_id.lower()} {call.start}"):
                self.record_check(evidence.accused_node, True)
                self.record_check(evidence.checker_node, True)
            return SpotCheckOutcome("pass", str(exc))
        self.record_check(result.accused_node, False)
        self.record_check(evidence.checker_node, True)
        self.slashes += 1
        detail = (
            f"node {result.accused_node} differs by {result.rel_diff:.3g} (tolerance {result.tolerance:.3g}); "
            f"slashed {result.slashed} token units of operator {result.operator}"
        )
        return SpotCheckOutcome("slashed", detail, result)

    def _count_once(self, key: str) -> bool:
        """True the first time ``key`` is seen (kept on disk); False after."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        with self._lock:
            if digest in self._counted:
                return False
            self._counted.add(digest)
            append_line(self._counted_log, digest)
        return True

    def report_failure(self, failure: SpotCheckFailure) -> bool:
        """A trusted runner says ``failure.node`` withheld what a drawn check needed: one failed
        verification for its reputation (once per node, job and range). False when already counted.

        Raises :class:`EvidenceRefusedError` (``unauthorized_runner``, nothing recorded) unless the
        statement is signed by one of the runners this oracle trusts.
        """
        runner = failure.runner(self.domain)
        if runner is None or runner.lower() not in {r.lower() for r in self.slasher.runners}:
            raise EvidenceRefusedError(
                "unauthorized_runner",
                f"failure report is signed by {runner or '(no valid signature)'}, not by one of the "
                f"{len(self.slasher.runners)} spot-check runners this oracle trusts (oracle spot_check_runners)",
            )
        node, job, start = failure.key()
        if not self._count_once(f"fail {node} {job} {start}"):
            return False
        self.record_check(failure.node, False)
        log.warning("node %s failed a spot check of job %s [%d, %d): %s %s", failure.node, failure.job_id,
                    failure.start, failure.end, failure.reason, failure.detail)  # fmt: skip
        return True

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
        new = 0
        for obs in batch.observations:
            node, job, start = obs.key()
            if not self._count_once(f"observed {node} {job} {start}"):
                continue
            with self._lock:
                self._observed[epoch].append(obs)
                append_line(self._observations_dir / f"{epoch}.jsonl", obs.model_dump_json())
            new += 1
        return new

    # ------------------------------------------------------------------ epochs

    def close_epoch(self, epoch: int) -> EpochRecord | None:
        """Score, post and store ``epoch``; ``None`` when nothing was seen in it (nothing posted)."""
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
            self._forget_before(epoch + 1)
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
        record = build_record(epoch, scores, digests)
        receipt = self.reputation.post_epoch(
            self.account, epoch, list(scores), list(scores.values()), bytes.fromhex(record.root[2:])
        )
        record = record.model_copy(update={"tx": "0x" + bytes(receipt["transactionHash"]).hex()})
        self.epochs.save(record)
        self.posted_epochs += 1
        self._forget_before(epoch + 1)
        contributions = {
            n: NodeContribution(
                uptime_fraction=stats[n].uptime_fraction,
                measured_tps=stats[n].reported_tps,
                latencies_ms=tuple(x for r in rs for x in r.report.metrics.latencies_ms),
            )
            for n, rs in by_node.items()
        }
        agg = release_aggregates(epoch, contributions, o.dp_epsilon, o.dp_capacity_clip_tps, self.accountant, self.rng)
        self.aggregates[epoch] = agg
        write_atomic(self.state_dir / "privacy.json", self.accountant.to_json())
        write_atomic(self.state_dir / "aggregates" / f"{epoch}.json", agg.model_dump_json(indent=1))
        log.info("posted epoch %d: %d nodes, root %s", epoch, len(scores), record.root)
        return record

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
            # compact the seq log to one line per node
            write_atomic(self._seq_log, "".join(f"{n} {q}\n" for n, q in sorted(self.intake.last_seq.items())))

    def latest_aggregates(self) -> Aggregates | None:
        if self.aggregates:
            return self.aggregates[max(self.aggregates)]
        agg_dir = self.state_dir / "aggregates"
        stored = max((int(p.stem) for p in agg_dir.glob("*.json")), default=None) if agg_dir.exists() else None
        if stored is None:
            return None
        return Aggregates.model_validate_json((agg_dir / f"{stored}.json").read_text())

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
        stored = self.epochs.epochs()
        if stored:
            record = self.epochs.load(stored[-1])
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
        closed = self.reputation.latest_epoch()
        while not stop.is_set():
            now = self.clock()
            due = self.epoch_of(now - self.config.telemetry_max_age_s) - 1
            if due > closed:
                try:
                    await asyncio.to_thread(self.close_epoch, due)
                except Exception:  # keep serving telemetry; the next pass retries (logged with traceback)
                    log.exception("closing epoch %d failed; retrying next pass", due)
                    with contextlib.suppress(Exception):  # posted but not stored: do not retry forever
                        closed = max(closed, self.reputation.latest_epoch())
                else:
                    closed = due
            next_close = (self.epoch_of(now) + 1) * self.config.epoch_s + self.config.telemetry_max_age_s
            with contextlib.suppress(TimeoutError):  # the timeout is the normal wake-up
                await asyncio.wait_for(stop.wait(), timeout=max(1.0, min(60.0, next_close - now)))


def default_state_dir(settings: Settings) -> Path:
    return settings.oracle.state_dir or settings.home / "oracle"
