"""Spot checks over real worker processes: a stage's call is re-executed on a replica from the
transcripts the stages kept, and the evidence is checked by the oracle's own rules.

Layout (tiny Llama, fp32): ``a`` [0, 2); ``m`` [2, 4) started with ``--byzantine`` and its honest
replica ``m2``; ``c``, ``c2`` and ``w`` [4, 6), all honest, but ``w`` keeps no transcripts. The evidence sink applies
:func:`check_evidence` (signatures, receipts, output hashes, runner authorisation, tolerance)
with every node counted as registered; the on-chain slash is tested in tests/integration/oracle.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from eth_account import Account

sys.path.insert(0, str(Path(__file__).parent))
from node_helpers import MODEL, Swarm, _wait_ready, driver_settings, run_pinned_job, tiny_shards, wait_for_spans

from dlis_market.broker.spot_checks import FinishedSession, SpotChecker
from dlis_market.chain.typed_data import Domain
from dlis_market.inference.messages import StageInput
from dlis_market.inference.sampling import SamplingParams
from dlis_market.node.call_checks import check_body
from dlis_market.node.driver import PipelineDriver
from dlis_market.node.errors import RemoteError
from dlis_market.node.protocol import OpenBody
from dlis_market.oracle.errors import EvidenceRefusedError
from dlis_market.oracle.verification import NodeInfo, check_evidence
from dlis_market.protocol.fingerprints import Fingerprint
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spot_checks import (
    FingerprintCheckPass,
    SpotCheckEvidence,
    SpotCheckFailure,
    SpotCheckSampler,
)

PROMPT = [3, 1, 4, 1, 5, 9]
RUNNER = Account.create()
ORACLE_DOMAIN = Domain("DLIS Oracle", "1", 31337, "0x" + "77" * 20)


class EvidenceChecker:
    """The oracle's acceptance rules without a chain: every node is registered."""

    def __init__(self, domain: Domain, require_referee: bool = False) -> None:
        self.domain = domain
        self.require_referee = require_referee
        self.verdicts: list[Any] = []
        self.failures: list[SpotCheckFailure] = []
        self.passes: list[FingerprintCheckPass] = []

    async def submit(self, evidence: SpotCheckEvidence) -> dict[str, Any]:
        lookup = lambda node: NodeInfo(operator=node, active=True)  # noqa: E731
        try:
            runners = [RUNNER.address]
            verdict = check_evidence(evidence, self.domain, lookup, ORACLE_DOMAIN, runners, self.require_referee)
        except EvidenceRefusedError as exc:
            outcome = "pass" if exc.reason == "within_tolerance" else f"refused:{exc.reason}"
            return {"outcome": outcome, "detail": str(exc)}
        self.verdicts.append(verdict)
        return {"outcome": "slashed", "detail": f"accused {verdict.accused_node}"}

    async def report_failure(self, failure: SpotCheckFailure) -> dict[str, Any]:
        assert failure.runner(ORACLE_DOMAIN) == RUNNER.address  # signed by the runner, as the oracle requires
        self.failures.append(failure)
        return {"recorded": True}

    async def report_fingerprint_pass(self, passed: FingerprintCheckPass) -> dict[str, Any]:
        assert passed.runner(ORACLE_DOMAIN) == RUNNER.address
        self.passes.append(passed)
        return {"recorded": True}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("spot-swarm")
    shards = tiny_shards(root, [(0, 2), (2, 4), (4, 6)], name=MODEL)
    with Swarm(root) as sw:
        launched = {
            "a": sw.launch(shards, "0:2", "a"),
            "m": sw.launch(shards, "2:4", "m", "--byzantine"),
            "m2": sw.launch(shards, "2:4", "m2"),
            "c": sw.launch(shards, "4:6", "c"),
            "c2": sw.launch(shards, "4:6", "c2"),
            # honest compute, but keeps no transcripts: its calls cannot be checked
            "w": sw.launch(shards, "4:6", "w", env={"DLIS_NODE__TRANSCRIPT_RETAIN_BYTES": "0"}),
        }
        for w in launched.values():
            w.info = _wait_ready(w.proc, 240, w.log_path)
        yield {"swarm": sw, "workers": launched, "shards": shards}


def hop(w: Any) -> RouteHop:
    return RouteHop(w.peer_id, w.info["node_address"], w.info["start"], w.info["end"], 10**12)


async def run_job(
    driver: PipelineDriver, route: list[RouteHop], new: int = 6, prompt: list[int] = PROMPT
) -> tuple[FinishedSession, list[int]]:
    return await run_pinned_job(driver, MODEL, route, prompt, new)  # type: ignore[no-any-return]


def test_byzantine_stage_is_caught_and_its_honest_neighbours_are_not(swarm: dict[str, Any]) -> None:
    w = swarm["workers"]

    async def run() -> None:
        driver = await PipelineDriver.create(swarm["swarm"].initial_peers, driver_settings())
        try:
            await wait_for_spans(driver, MODEL, 5)
            sink = EvidenceChecker(driver.market)
            checker = SpotChecker(driver, SpotCheckSampler(1.0, b"k"), bytes(RUNNER.key), ORACLE_DOMAIN, sink,
                                  lambda _model: ("fp32", 32))  # fmt: skip

            # route through the cheater: its middle-stage output is compared with m2's
            finished, _ = await run_job(driver, [hop(w["a"]), hop(w["m"]), hop(w["c"])])
            results = await checker.check(finished, [0, 1, 2])
            by_start = {r.start: r for r in results}
            assert by_start[0].outcome == "skipped:no-replica"  # nobody else serves [0, 2)
            assert by_start[2].outcome == "slashed", by_start[2]
            assert by_start[2].accused == w["m"].info["node_address"]
            assert by_start[2].rel_diff is not None and by_start[2].rel_diff > 0.1
            # c ran on the cheater's (corrupted) hidden states; re-run on c2 with the same inputs it matches
            assert by_start[4].outcome == "pass", by_start[4]
            assert [v.accused_node for v in sink.verdicts] == [w["m"].info["node_address"]]

            # honest routes, many prompts and lengths, every checkable call checked: nobody is accused
            for i in range(12):
                prompt = [(7 * i + j) % 90 + 1 for j in range(2 + i % 5)]
                route = [hop(w["a"]), hop(w["m2"]), hop(w["c2" if i % 2 else "c"])]
                finished, _ = await run_job(driver, route, new=3 + i % 4, prompt=prompt)
                results = await checker.check(finished, [2])  # [4, 6): c and c2 check each other
                assert [r.outcome for r in results] == ["pass"], results
                assert results[0].rel_diff == 0.0  # same fp32 shard, same inputs, same CPU kernels
            assert len(sink.verdicts) == 1

            # a session id cannot be reused to replace the transcript kept for the first session
            last = finished.route[2]
            body = OpenBody(
                session_id=finished.session_id, model=MODEL, start=last.start, end=last.end, max_length=32,
                job_id=finished.spec.job_id, reply_to=driver.peer_id, next_peer=None,
                ticket=driver.ticket(finished.spec.job_id, MODEL, last),
            )  # fmt: skip
            with pytest.raises(RemoteError, match="in use or was used recently"):
                await driver.pool.request(last.peer_id, "open", body.model_dump(), 10)

            # transcripts are the client's data: only the peer that opened the session may read them
            other = await PipelineDriver.create(swarm["swarm"].initial_peers, driver_settings())
            try:
                with pytest.raises(RemoteError, match="opened by another peer"):
                    await other.pool.request(w["c2"].peer_id, "transcript", {"session_id": finished.session_id}, 10)
            finally:
                await other.close()
        finally:
            await driver.close()

    asyncio.run(run())


def test_sampled_fraction_and_failover_sessions(swarm: dict[str, Any]) -> None:
    """schedule() draws stage calls by the secret sampler; a session that failed over is not checked."""
    w = swarm["workers"]

    async def run() -> None:
        driver = await PipelineDriver.create(swarm["swarm"].initial_peers, driver_settings())
        try:
            await wait_for_spans(driver, MODEL, 5)
            sink = EvidenceChecker(driver.market, require_referee=True)
            checker = SpotChecker(driver, SpotCheckSampler(0.0, secrets.token_bytes(32)), bytes(RUNNER.key),
                                  ORACLE_DOMAIN, sink, lambda _model: ("fp32", 32))  # fmt: skip
            finished, _ = await run_job(driver, [hop(w["a"]), hop(w["m2"]), hop(w["c2"])], new=2)
            assert checker.schedule(finished) == []
            assert checker.schedule(None) == [] and checker.counts["skipped:failover"] == 1
            checker.sampler = SpotCheckSampler(1.0, b"k")
            assert checker.schedule(finished) == [0, 2, 4]
            await checker.drain()
            # m2's only replica is the cheater m: its mismatch alone proves nothing, and an oracle that
            # requires a referee (a third node agreeing with the checker) refuses to slash m2
            assert sorted(checker.counts.elements()) == sorted(
                ["skipped:failover", "skipped:no-replica", "refused:referee_required", "pass"]
            )
            assert sink.verdicts == []
        finally:
            await driver.close()

    asyncio.run(run())


def test_a_stage_that_keeps_no_transcript_gets_a_signed_failed_verification(swarm: dict[str, Any]) -> None:
    """No evidence, no slash; but whoever withholds what a drawn check needs is reported."""
    w = swarm["workers"]

    async def run() -> None:
        driver = await PipelineDriver.create(swarm["swarm"].initial_peers, driver_settings())
        try:
            await wait_for_spans(driver, MODEL, 6)
            sink = EvidenceChecker(driver.market)
            checker = SpotChecker(driver, SpotCheckSampler(1.0, b"k"), bytes(RUNNER.key), ORACLE_DOMAIN, sink,
                                  lambda _model: ("fp32", 32))  # fmt: skip
            finished, _ = await run_job(driver, [hop(w["a"]), hop(w["m2"]), hop(w["w"])])
            # m2's outputs are w's inputs, which w did not keep; w's own inputs likewise
            results = await checker.check(finished, [1, 2])
            assert [r.outcome for r in results] == ["withheld", "withheld"], results
            assert "gave no transcript" in results[0].detail
            assert {(f.node, f.start, f.job_id) for f in sink.failures} == {
                (w["w"].info["node_address"], 4, "0x" + finished.spec.job_id.hex())
            }
            assert sink.verdicts == []
        finally:
            await driver.close()

    asyncio.run(run())


def test_every_call_is_committed_and_fingerprint_checks_catch_the_cheater_with_one_prefill(
    swarm: dict[str, Any],
) -> None:
    """Each receipt comes with the node's signed fingerprint of the call; a fingerprint check
    (one prefill on a replica) passes honest calls and escalates the cheater's to evidence."""
    w = swarm["workers"]

    async def run() -> None:
        driver = await PipelineDriver.create(swarm["swarm"].initial_peers, driver_settings())
        try:
            await wait_for_spans(driver, MODEL, 6)
            sink = EvidenceChecker(driver.market)
            checker = SpotChecker(driver, SpotCheckSampler(0.0, b"k"), bytes(RUNNER.key), ORACLE_DOMAIN, sink,
                                  lambda _model: ("fp32", 32), fingerprints=SpotCheckSampler(1.0, b"f"))  # fmt: skip
            finished, _ = await run_job(driver, [hop(w["a"]), hop(w["m"]), hop(w["c"])])
            for k, h in enumerate(finished.route):
                r = finished.receipts[h.start]
                fp = Fingerprint.from_bytes(r.fingerprint)
                assert (fp.num_tokens, fp.hidden_size) == (r.signed.receipt.tokens, 32), k
            assert checker.schedule(finished) == [0, 2, 4]  # every call drawn, all by the fingerprint sampler
            await checker.drain()
            by_start = {r.start: r for r in checker.results}
            assert by_start[0].outcome == "skipped:no-replica"
            # the cheater's fingerprint is that of the noise it sent: the replica's prefill rejects it
            # and the full re-execution that follows gives the oracle its evidence
            assert by_start[2].outcome == "slashed", by_start[2]
            assert by_start[2].detail.startswith("fingerprint rejected by"), by_start[2].detail
            # c ran (honestly) on the cheater's states: one prefill on c2 over the same inputs agrees
            assert by_start[4].outcome == "pass:fingerprint", by_start[4]
            assert by_start[4].checker in {w["c2"].info["node_address"], w["w"].info["node_address"]}
            assert [v.accused_node for v in sink.verdicts] == [w["m"].info["node_address"]]
            # the accepted call goes to the oracle as the runner's signed pass of c's commitment
            c_fingerprint = finished.receipts[4].fingerprint
            assert [(p.node, p.checker, p.job_id, p.start, p.end, p.fingerprint_hash) for p in sink.passes] == [
                (w["c"].info["node_address"], by_start[4].checker, "0x" + finished.spec.job_id.hex(), 4, 6,
                 "0x" + hashlib.sha256(c_fingerprint).hexdigest())
            ]  # fmt: skip
            assert by_start[4].detail.endswith("oracle: {'recorded': True}"), by_start[4].detail

            # honest calls at the last stage, tokens re-derived from the prefill's logits: no accusation
            checker.results.clear()
            for i in range(4):
                prompt = [(11 * i + j) % 90 + 1 for j in range(3 + i)]
                route = [hop(w["a"]), hop(w["m2"]), hop(w["c2" if i % 2 else "c"])]
                finished, _ = await run_job(driver, route, new=2 + i, prompt=prompt)
                results = await checker.check(finished, [], [2])
                assert [r.outcome for r in results] == ["pass:fingerprint"], results
                assert f"{finished.generated.__len__()} tokens re-derived" in results[0].detail
            assert len(sink.verdicts) == 1 and len(sink.passes) == 5

            # a check is a broker's request: without a ticket for the job the replica spends nothing
            states = [StageInput(("s",), (0,), 0, hidden=torch.zeros(1, 3, 32))]
            body = check_body(hop(w["c2"]), MODEL, finished.spec.job_id, {}, states, b"", [], SamplingParams())
            with pytest.raises(RemoteError, match="ticket"):
                await driver.pool.request(w["c2"].peer_id, "fingerprint_check", body, 10)
        finally:
            await driver.close()

    asyncio.run(run())


def test_a_fingerprint_of_other_rows_than_those_sent_is_caught(swarm: dict[str, Any]) -> None:
    """A cheater that fingerprints honest states but sends others would pass a prefill check; the
    runner recomputes the fingerprint of the rows the next stage received, and escalates."""
    w = swarm["workers"]
    env = {"DLIS_NODE__BYZANTINE_COMMITS_COMPUTED": "true"}
    liar = swarm["swarm"].launch(swarm["shards"], "2:4", "liar", "--byzantine", env=env)
    liar.info = _wait_ready(liar.proc, 240, liar.log_path)

    async def run() -> None:
        driver = await PipelineDriver.create(swarm["swarm"].initial_peers, driver_settings())
        try:
            await wait_for_spans(driver, MODEL, 7)
            sink = EvidenceChecker(driver.market)
            honest = lambda node: node in {w["m2"].info["node_address"], w["c2"].info["node_address"]}  # noqa: E731
            checker = SpotChecker(driver, SpotCheckSampler(0.0, b"k"), bytes(RUNNER.key), ORACLE_DOMAIN, sink,
                                  lambda _model: ("fp32", 32), eligible=honest)  # fmt: skip
            finished, _ = await run_job(driver, [hop(w["a"]), hop(liar), hop(w["c"])])
            [result] = await checker.check(finished, [], [1])
            assert result.outcome == "slashed", result
            assert result.detail.startswith("its signed fingerprint is not that of the rows it sent"), result.detail
            assert [v.accused_node for v in sink.verdicts] == [liar.info["node_address"]]
        finally:
            await driver.close()

    asyncio.run(run())
