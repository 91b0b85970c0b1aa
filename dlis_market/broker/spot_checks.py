"""The spot-check runner: re-execute a fraction of finished stage calls elsewhere; report to the oracle.

After every job that ran on one route (no failover), the broker draws each stage call
``(job id, start)`` with :class:`SpotCheckSampler` (``broker.spot_check_fraction``, a secret kept
in ``$DLIS_HOME/broker/spot_check_secret``: workers cannot tell which calls will be checked, and
they have signed their receipts before any check starts). For a drawn call of the accused stage:

1. its inputs: the session's tokens (first stage) or the stage's own transcript, which must hash
   to the previous stage's signed ``outputHash``;
2. its outputs: the tokens this driver received (last stage) or the next stage's transcript,
   which must hash to the accused's own signed ``outputHash``;
3. a replica serving the same range (another node, routable: staked) re-runs the inputs in a fresh session of the
   same job (:func:`dlis_market.node.replay.replay`); on a mismatch a second replica, when there
   is one, referees;
4. :func:`build_evidence` signs it all with the broker's key and the oracle gets it
   (``POST /v1/spot-checks``, through the broker's persisted outbox: while the oracle or its chain
   is down the evidence waits, across a broker restart too, and is counted once): within
   tolerance it credits both nodes' verification record, beyond it the oracle slashes the
   accused's operator on StakingManager; a node below the minimum stake is no longer routable, so
   the next jobs avoid it. Failure reports travel the same way.

A stage that does not hand over a transcript the check needs (it refuses, dropped it, or is gone)
cannot be slashed (there is no evidence), but the broker signs a :class:`SpotCheckFailure` and the
oracle counts a failed verification against that node's reputation.

**Fingerprint checks** come first where a second sampler draws more calls
(``broker.fingerprint_check_fraction``, the same secret under another label): every stage signs
with its receipt a fingerprint of the activations of its call (``node/receipts.py``), and a
replica validates the call from it with one prefill instead of a decode per token
(:func:`dlis_market.node.replay.check_on`), after the runner checked, for a stage that sends hidden
states, that the fingerprint is exactly that of the rows it sent. A rejected (or false)
fingerprint escalates to the full re-execution above, whose evidence the oracle judges; an
accepted one is ``pass:fingerprint``, and the runner's signed :class:`FingerprintCheckPass` goes
to the oracle (through the same outbox), which counts it as a passed verification of the node.

Checks run in the background, at most ``concurrency`` at a time, and never delay the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import random
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
from eth_utils import keccak

from dlis_market.broker.spot_check_sink import (  # noqa: F401  (re-exported: where callers import them)
    EVIDENCE_KIND,
    FAILURE_KIND,
    OracleSink,
    answer_dict,
)
from dlis_market.chain.typed_data import Domain
from dlis_market.errors import DlisError
from dlis_market.node.driver import JobSession, JobSpec, PipelineDriver
from dlis_market.node.errors import PeerUnreachableError, ProtocolError, RemoteError
from dlis_market.node.receipts import fingerprint_hash
from dlis_market.node.replay import (
    Layout,
    StageRows,
    TranscriptMalformedError,
    check_on,
    checked,
    fetch_transcript,
    replay,
    token_rows,
    token_steps,
)
from dlis_market.node.transcripts import Transcript
from dlis_market.protocol.errors import FingerprintError
from dlis_market.protocol.fingerprints import commits_to
from dlis_market.protocol.outbox import OutboxError
from dlis_market.protocol.outputs import compare_outputs, decode_output
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spot_checks import (
    FingerprintCheckPass,
    SpotCheckEvidence,
    SpotCheckFailure,
    SpotCheckSampler,
    build_evidence,
    load_or_create_secret,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinishedSession:
    """What a check needs from a job that ran on one route (captured before the session closes)."""

    spec: JobSpec
    session_id: str
    route: tuple[RouteHop, ...]
    receipts: dict[int, StageReceipt]  # by start layer
    generated: tuple[int, ...]
    private: bool = False  # privacy=high: the first hop's inputs are the driver's, after its private stage

    @classmethod
    def of(cls, session: JobSession, route: Sequence[RouteHop]) -> FinishedSession | None:
        """``None`` when the session failed over (its calls span several routes: not checked)."""
        mine = {
            r.signed.receipt.start: r for r in session.receipts if r.session_id == session.session_id and not r.share
        }
        if session.failovers or len(mine) != len(route) or not session.generated:
            return None
        private = session.shares is not None
        return cls(session.spec, session.session_id, tuple(route), mine, tuple(session.generated), private)


@dataclass(frozen=True)
class CheckResult:
    job_id: str
    start: int
    end: int
    accused: str
    outcome: str  # pass | slashed | refused:<reason> | skipped:<why> | error
    detail: str
    rel_diff: float | None = None
    checker: str | None = None


@dataclass(frozen=True)
class Call:
    """A drawn stage call ready to check: its inputs and outputs (checked against the signed
    receipts) and the replicas that may re-run it."""

    hop: RouteHop
    job: str  # 0x job id
    accused: StageReceipt
    last: bool
    inputs: StageRows
    outputs: StageRows
    replicas: list[RouteHop]

    def result(
        self, outcome: str, detail: str, rel_diff: float | None = None, checker: str | None = None
    ) -> CheckResult:
        h = self.hop
        return CheckResult(self.job, h.start, h.end, h.node, outcome, detail, rel_diff, checker)


class EvidenceSink(Protocol):
    async def submit(self, evidence: SpotCheckEvidence) -> dict[str, Any]: ...

    async def report_failure(self, failure: SpotCheckFailure) -> dict[str, Any]: ...

    async def report_fingerprint_pass(self, passed: FingerprintCheckPass) -> dict[str, Any]: ...


class TooLarge(DlisError):
    """A transcript is over the stream's frame limit (node.max_message_bytes): not checkable."""


class Withheld(DlisError):
    """A stage did not hand over a transcript the check needs (refused, dropped it, or is gone)."""

    def __init__(self, hop: RouteHop, reason: str) -> None:
        super().__init__(f"{hop.node} [{hop.start}, {hop.end}) gave no transcript: {reason}")
        self.hop = hop


class SpotChecker:
    def __init__(
        self,
        driver: PipelineDriver,
        sampler: SpotCheckSampler,
        runner_key: bytes,
        oracle_domain: Domain,
        sink: EvidenceSink,
        model_shape: Callable[[str], tuple[str, int]],
        concurrency: int = 2,
        rng: random.Random | None = None,
        eligible: Callable[[str], bool] | None = None,
        fingerprints: SpotCheckSampler | None = None,
    ) -> None:
        self.driver = driver
        self.sampler = sampler  # calls re-executed in full
        self.fingerprints = fingerprints  # further calls validated from their fingerprint first
        self.runner_key = runner_key
        self.oracle_domain = oracle_domain
        self.sink = sink
        self.model_shape = model_shape  # model name -> (manifest dtype: fp32/bf16/int8/nf4, hidden size)
        self.rng = rng or random.Random()
        # which nodes may re-execute (the broker: routable on chain, i.e. staked; a slashed cheater is not)
        self.eligible = eligible or (lambda _node: True)
        self.counts: Counter[str] = Counter()
        self.results: deque[CheckResult] = deque(maxlen=1000)
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[list[CheckResult]]] = set()
        self.on_result: Callable[[CheckResult], object] | None = None  # e.g. a metrics counter

    @staticmethod
    def secret(home: Path) -> bytes:
        return load_or_create_secret(home / "broker" / "spot_check_secret")

    @staticmethod
    def fingerprint_secret(secret: bytes) -> bytes:
        """The fingerprint sampler's key, derived from the broker's: its draws are independent of
        the re-execution sampler's and just as unpredictable to workers."""
        return bytes(keccak(b"dlis fingerprint checks" + secret))

    def schedule(self, finished: FinishedSession | None) -> list[int]:
        """Start checking the drawn stages of ``finished`` in the background; their start layers."""
        if finished is None:
            self.counts["skipped:failover"] += 1
            return []
        job = finished.spec.job_id
        # A private job's first hop took hidden states no signed receipt commits to (the share
        # workers' receipts cover shares): it is not drawn; the hops after it are, as usual.
        first = 1 if finished.private else 0
        picked = [k for k, hop in enumerate(finished.route) if k >= first and self.sampler.selected(job, hop.start)]
        cheap = [
            k
            for k, hop in enumerate(finished.route)
            if k >= first
            and k not in picked
            and self.fingerprints is not None
            and self.fingerprints.selected(job, hop.start)
        ]
        if picked or cheap:
            task = asyncio.create_task(self.check(finished, picked, cheap))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return sorted(finished.route[k].start for k in picked + cheap)

    async def drain(self) -> None:
        """Wait for every scheduled check (tests and benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if isinstance(self.sink, OracleSink):  # what the oracle has not taken stays in the outbox file
            await self.sink.close()

    async def check(
        self, finished: FinishedSession, stages: Sequence[int], by_fingerprint: Sequence[int] = ()
    ) -> list[CheckResult]:
        """Check ``stages`` (indices into the route) by re-execution and ``by_fingerprint`` from
        their fingerprints first; the results in route order."""
        runs = sorted([(k, self.check_stage) for k in stages] + [(k, self.check_fingerprint) for k in by_fingerprint])
        out = []
        for k, run in runs:
            async with self._slots:
                try:
                    result = await run(finished, k)
                except Exception as exc:  # one check's failure must not end the others (logged below)
                    if not isinstance(exc, DlisError | httpx.HTTPError | ValueError | TimeoutError):
                        log.exception("spot check of stage %d of job 0x%s crashed", k, finished.spec.job_id.hex())
                    hop = finished.route[k]
                    result = CheckResult(
                        "0x" + finished.spec.job_id.hex(), hop.start, hop.end, hop.node, "error", str(exc)
                    )
            self.counts[result.outcome] += 1
            self.results.append(result)
            if self.on_result is not None:
                self.on_result(result)
            level = logging.WARNING if result.outcome not in ("pass",) else logging.INFO
            log.log(level, "spot check of %s [%d, %d) in job %s: %s (%s)", result.accused, result.start, result.end,
                    result.job_id, result.outcome, result.detail)  # fmt: skip
            out.append(result)
        return out

    def _layout(self, f: FinishedSession) -> Layout:
        """How hidden states between stages of this session look: the runner's own knowledge."""
        shard_dtype, hidden = self.model_shape(f.spec.model)
        element = "float32" if shard_dtype == "fp32" else "bfloat16"  # activations (inference/quantization.py)
        return Layout.of_session(len(f.spec.prompt_ids), len(f.generated), element, hidden)

    def _checked(
        self, f: FinishedSession, hop: RouteHop, transcript: Transcript, signed: bytes, what: str
    ) -> StageRows:
        try:
            return checked(transcript, signed, self._layout(f), what)
        except TranscriptMalformedError as exc:  # bytes that are not this session's: as good as withheld
            raise Withheld(hop, str(exc)) from exc

    async def _inputs(self, f: FinishedSession, k: int) -> StageRows:
        if k == 0:
            return token_steps(f.session_id, f.spec.prompt_ids, f.generated)
        prev = f.receipts[f.route[k - 1].start].signed.receipt
        transcript = await self._transcript(f, f.route[k])
        what = f"input of [{f.route[k].start}, {f.route[k].end})"
        return self._checked(f, f.route[k], transcript, prev.output_hash, what)

    async def _outputs(self, f: FinishedSession, k: int) -> StageRows:
        signed = f.receipts[f.route[k].start].signed.receipt.output_hash
        if k == len(f.route) - 1:
            rows = StageRows("int64", token_rows(f.generated), [])
            if rows.sha256() != signed:
                raise DlisError(
                    f"the last stage signed output 0x{signed.hex()} but sent tokens hashing to 0x{rows.sha256().hex()}"
                )
            return rows
        transcript = await self._transcript(f, f.route[k + 1])
        what = f"output of [{f.route[k].start}, {f.route[k].end})"
        return self._checked(f, f.route[k + 1], transcript, signed, what)

    async def _transcript(self, f: FinishedSession, hop: RouteHop) -> Transcript:
        try:
            return await fetch_transcript(self.driver, hop.peer_id, f.session_id)
        except RemoteError as exc:
            if exc.code == "too_large":  # over one frame: the session is too long to check, nobody's fault
                raise TooLarge(str(exc)) from exc
            raise Withheld(hop, str(exc)) from exc
        except (PeerUnreachableError, ProtocolError) as exc:
            raise Withheld(hop, str(exc)) from exc

    async def _prepare(self, f: FinishedSession, k: int) -> Call | CheckResult:
        """Call ``k``'s inputs and outputs, each checked against the signed receipts, and its
        replicas; or the result when a stage withheld them (reported to the oracle), they are too
        large to check, or no other node serves the range."""
        hop = f.route[k]
        job = "0x" + f.spec.job_id.hex()
        try:
            inputs, outputs = await self._inputs(f, k), await self._outputs(f, k)
        except Withheld as exc:  # no evidence to slash on; a failed verification for whoever withheld
            failure = SpotCheckFailure(
                node=exc.hop.node, job_id=job, start=exc.hop.start, end=exc.hop.end, detail=str(exc)[:500]
            ).signed_by_runner(self.runner_key, self.oracle_domain)
            answer = await self.sink.report_failure(failure)
            return CheckResult(job, hop.start, hop.end, hop.node, "withheld", f"{exc}; oracle: {answer}")
        except TooLarge as exc:
            return CheckResult(job, hop.start, hop.end, hop.node, "skipped:too-large", str(exc))
        replicas = await self._replicas(f, hop)
        if not replicas:
            return CheckResult(job, hop.start, hop.end, hop.node, "skipped:no-replica",
                               "no other node serves this range")  # fmt: skip
        last = k == len(f.route) - 1
        return Call(hop, job, f.receipts[hop.start], last, inputs, outputs, replicas)

    async def _replicas(self, f: FinishedSession, hop: RouteHop) -> list[RouteHop]:
        """Other staked nodes serving exactly ``hop``'s range, in random order."""
        spans = await self.driver.discover(f.spec.model)
        banned = self.driver.banned()
        replicas = [
            RouteHop.of(s)
            for s in spans
            if (s.start, s.end) == (hop.start, hop.end)
            and s.peer_id != hop.peer_id
            and s.node_address.lower() != hop.node.lower()
            and s.peer_id not in banned
            and self.eligible(s.node_address)
        ]
        self.rng.shuffle(replicas)
        return replicas

    async def check_fingerprint(self, f: FinishedSession, k: int) -> CheckResult:
        """Validate call ``k`` from its signed fingerprint with one prefill on a replica; a
        fingerprint that is rejected, or is not that of the rows sent, escalates to :meth:`check_stage`."""
        c = await self._prepare(f, k)
        if isinstance(c, CheckResult):
            return c
        if not c.last:
            sent = [s.hidden.reshape(-1, s.hidden.shape[-1]) for s in c.outputs.inputs if s.hidden is not None]
            try:
                honest_commitment = commits_to(c.accused.fingerprint, sent)
            except FingerprintError:
                honest_commitment = False
            if not honest_commitment:
                return await self._escalate(f, c, "its signed fingerprint is not that of the rows it sent")
        generated = f.generated if c.last else ()
        answer = await check_on(self.driver, c.replicas[0], f.spec.model, f.spec.job_id, c.inputs.inputs,
                                c.accused.fingerprint, generated, f.spec.sampling, f.spec.adapter)  # fmt: skip
        if not answer.accepted:
            return await self._escalate(f, c, f"fingerprint rejected by {answer.node_address}: {answer.reason}")
        tokens = f", {answer.tokens_checked} tokens re-derived" if c.last else ""
        detail = f"{answer.reason} (margin {answer.margin:.2f}{tokens}, prefill {answer.prefill_s * 1000:.0f} ms)"
        passed = FingerprintCheckPass(
            node=c.accused.node, checker=answer.node_address, job_id=c.job, start=c.hop.start, end=c.hop.end,
            fingerprint_hash="0x" + fingerprint_hash(c.accused.fingerprint).hex(), detail=detail[:500],
        ).signed_by_runner(self.runner_key, self.oracle_domain)  # fmt: skip
        try:  # a passed verification for the node; the check passed whether or not it can be sent
            detail += f"; oracle: {await self.sink.report_fingerprint_pass(passed)}"
        except OutboxError as exc:
            detail += f"; not sent to the oracle: {exc}"
        return c.result("pass:fingerprint", detail, checker=answer.node_address)

    async def _escalate(self, f: FinishedSession, c: Call, why: str) -> CheckResult:
        """Re-execute a call whose fingerprint did not check, with the inputs, outputs and replicas
        the fingerprint check already gathered."""
        result = await self._re_execute(f, c)
        return dataclasses.replace(result, detail=f"{why}; re-executed: {result.detail}")

    async def check_stage(self, f: FinishedSession, k: int) -> CheckResult:
        """Re-execute call ``k`` on a replica (a referee on a mismatch) and send the evidence."""
        c = await self._prepare(f, k)
        return c if isinstance(c, CheckResult) else await self._re_execute(f, c)

    async def _re_execute(self, f: FinishedSession, c: Call) -> CheckResult:
        inputs, outputs, replicas, last = c.inputs, c.outputs, c.replicas, c.last
        max_length = len(f.spec.prompt_ids) + f.spec.max_new_tokens
        run = [f.spec.model, f.spec.job_id, inputs.inputs, max_length, f.spec.sampling, last, f.spec.adapter]
        checker_rows, checker_receipt = await replay(self.driver, replicas[0], *run)  # type: ignore[arg-type]
        if (checker_rows.dtype, len(checker_rows.data)) != (outputs.dtype, len(outputs.data)):
            why = (f"checker {replicas[0].node} output {len(checker_rows.data)} bytes of {checker_rows.dtype},"
                   f" not {len(outputs.data)} of {outputs.dtype}: not used")  # fmt: skip
            return c.result("error", why)
        shard_dtype = "ids" if last else self.model_shape(f.spec.model)[0]
        accused_out = decode_output(outputs.data, outputs.dtype)
        checker_out = decode_output(checker_rows.data, checker_rows.dtype)
        cmp = compare_outputs(accused_out, checker_out, shard_dtype, outputs.width)
        referee: tuple[StageRows, Any] | None = None
        if not cmp.within and len(replicas) > 1:
            referee = await replay(self.driver, replicas[1], *run)  # type: ignore[arg-type]
            if (referee[0].dtype, len(referee[0].data)) != (outputs.dtype, len(outputs.data)):
                referee = None  # does not fit the call: evidence without a referee
        evidence = build_evidence(
            c.accused.signed,
            checker_receipt,
            outputs.data,
            checker_rows.data,
            outputs.dtype,  # type: ignore[arg-type]
            shard_dtype,  # type: ignore[arg-type]
            hashlib.sha256(inputs.data).digest(),
            self.driver.market,
            self.runner_key,
            self.oracle_domain,
            referee=referee[1] if referee else None,
            referee_output=referee[0].data if referee else None,
            row_width=outputs.width,
        )
        answer = await self.sink.submit(evidence)
        return c.result(str(answer.get("outcome")), str(answer.get("detail", "")), cmp.rel_diff, replicas[0].node)
