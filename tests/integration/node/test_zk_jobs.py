"""Jobs that ask for a proof (``proof: zk``): the last stage proves with EZKL (halo2) that its head
picked each token from the activations its fingerprint commits to; the broker's check
(broker/zk_proofs.py) accepts only a proof that verifies against a circuit it sets up itself from
the public weights, is signed for the receipt, starts from the committed rows and picks exactly
the receipt's tokens. Written as the last stage that would like to be paid for an unproven answer.

Tiny Llama (hidden 16, vocabulary 32, fp32): ``a`` [0, 1); ``b`` and the cheater ``liar`` (shifts
the tokens it returns) [1, 2). One SRS made by the test stands for the oracle's (zk.srs_dir).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from node_helpers import Swarm, _wait_ready, driver_settings, run_pinned_job, tiny_fp32_shards, wait_for_spans

from dlis_market.broker.backend import BackendJob
from dlis_market.broker.p2p_backend import P2PBackend
from dlis_market.broker.zk_proofs import HeadProofs
from dlis_market.chain.job_market import receipt_signer
from dlis_market.inference.stage import Stage
from dlis_market.inference.zk_stage import head_circuit
from dlis_market.node.driver import PipelineDriver
from dlis_market.node.errors import RemoteError
from dlis_market.node.protocol import OpenBody
from dlis_market.oracle.zk_verify import ZkProofRefusedError
from dlis_market.protocol.routes import RouteHop
from dlis_market.settings import Settings, ZkSettings

MODEL = "tiny-zk"
PROMPT = [3, 1, 4, 1, 5]
NEW = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("zk-swarm")
    _, shards = tiny_fp32_shards(root, MODEL, split=1, layers=2, vocab_size=32, hidden=16)
    # the verifier sets the circuit up first and makes the SRS every prover must use (the oracle's role)
    verifier_cache = root / "zk-verifier"
    head_circuit(Stage.load(shards, index=1).model, NEW, verifier_cache, None)
    settings = Settings(home=root / "broker", zk=ZkSettings(srs_dir=verifier_cache / "srs", cache_dir=verifier_cache))
    env = {"DLIS_ZK__SRS_DIR": str(verifier_cache / "srs")}
    with Swarm(root / "swarm") as sw:
        workers = {
            "a": sw.launch(shards, "0:1", "a", env=env),
            "b": sw.launch(shards, "1:2", "b", env=env),
            "liar": sw.launch(shards, "1:2", "liar", "--byzantine", env=env),
        }
        for w in workers.values():
            w.info = _wait_ready(w.proc, 240, w.log_path)
        yield {"swarm": sw, "workers": workers, "shards": shards, "settings": settings}


def hop(w: Any) -> RouteHop:
    return RouteHop(w.peer_id, w.info["node_address"], w.info["start"], w.info["end"], 10**12)


def last_stage(finished: Any, **changes: Any) -> Any:
    """``finished`` with its last stage's receipt changed (what a lying stage could send)."""
    receipts = {**finished.receipts, 1: dataclasses.replace(finished.receipts[1], **changes)}
    return dataclasses.replace(finished, receipts=receipts)


def check(world: dict[str, Any], driver: PipelineDriver, finished: Any) -> str:
    last = finished.receipts[1]
    assert last.node == receipt_signer(driver.market, last.signed.receipt, last.signed.signature.signature)
    proofs = HeadProofs(world["settings"])
    return proofs.verify(world["shards"], last, driver.market, len(PROMPT), list(finished.generated)).account


def test_a_proven_job_and_the_ways_to_pass_off_an_unproven_answer(world: dict[str, Any]) -> None:
    w = world["workers"]

    async def run() -> None:
        driver = await PipelineDriver.create(world["swarm"].initial_peers, driver_settings())
        try:
            await wait_for_spans(driver, MODEL, 3)
            finished, tokens = await run_pinned_job(driver, MODEL, [hop(w["a"]), hop(w["b"])], PROMPT, NEW, proof="zk")
            assert len(tokens) == NEW
            claim = finished.receipts[1].proof
            assert claim is not None and not claim.error and claim.prove_ms > 0, claim
            assert finished.receipts[0].proof is None  # only the last stage proves
            assert check(world, driver, finished).startswith(f"proof verified (zk, halo2 over {NEW} head calls")

            last = finished.receipts[1]
            # the rows sent with the proof must be the activations the fingerprint commits to
            # (rows a cheater would make up so that its proof picks its tokens: here the last row moved)
            rows = np.frombuffer(claim.rows, dtype="<f4").copy()
            rows[-16] += 50.0
            forged = last_stage(finished, proof=dataclasses.replace(claim, rows=rows.tobytes()))
            with pytest.raises(ZkProofRefusedError, match="fingerprint commits to") as err:
                check(world, driver, forged)
            assert err.value.reason == "not_committed"
            # a stage that could not (or would not) prove gets no accepted answer
            none = last_stage(finished, proof=dataclasses.replace(claim, error="gave up"))
            with pytest.raises(ZkProofRefusedError, match="gave up"):
                check(world, driver, none)

            # the cheater returns other tokens than its head picked: its own honest proof betrays it
            cheat, _ = await run_pinned_job(driver, MODEL, [hop(w["a"]), hop(w["liar"])], PROMPT, NEW, proof="zk")
            assert cheat.generated != finished.generated
            with pytest.raises(ZkProofRefusedError) as err:
                check(world, driver, cheat)
            assert err.value.reason == "output_mismatch", err.value
            # nor can it lift the honest stage's proof onto its own receipt
            moved = last_stage(cheat, proof=claim, fingerprint=last.fingerprint)
            with pytest.raises(ZkProofRefusedError):
                check(world, driver, moved)

            # a proof is asked of the last stage only: a first stage refuses, the job's fault not its own
            job = b"\x05" * 32
            body = OpenBody(
                session_id="zk-first", model=MODEL, start=0, end=1, max_length=16, job_id=job,
                reply_to=driver.peer_id, next_peer=w["b"].peer_id, ticket=driver.ticket(job, MODEL, hop(w["a"])),
                proof="zk",
            )  # fmt: skip
            with pytest.raises(RemoteError, match="not the last stage") as refused:
                await driver.pool.request(w["a"].peer_id, "open", body.wire(), 30)
            assert refused.value.code == "ZkUnsupportedError"
        finally:
            await driver.close()

    asyncio.run(run())


def test_the_broker_backend_accepts_an_answer_only_with_its_verified_proof(world: dict[str, Any]) -> None:
    """P2PBackend hands the last stage's proof to the service's check before the answer counts."""
    w = world["workers"]

    async def run() -> None:
        driver = await PipelineDriver.create(world["swarm"].initial_peers, driver_settings())
        backend = P2PBackend(driver)
        proofs = HeadProofs(world["settings"])
        checked: list[str] = []

        async def check_proof(receipt: Any, prompt: Any, generated: Any) -> None:
            args = (world["shards"], receipt, driver.market, len(prompt), list(generated))
            checked.append((await asyncio.to_thread(proofs.verify, *args)).account)

        try:
            await wait_for_spans(driver, MODEL, 3)
            for last, ok in (("b", True), ("liar", False)):
                job = BackendJob(job_id=secrets.token_bytes(32), model=MODEL, prompt_ids=PROMPT, max_new_tokens=NEW,
                                 max_cost=10**18, num_layers=2, route=[hop(w["a"]), hop(w[last])], proof="zk",
                                 check_proof=check_proof)  # fmt: skip
                stream = await backend.start(job)
                assert len([t async for t in stream.tokens()]) == NEW
                if ok:
                    route, receipts = await stream.finish()
                    assert len(receipts) == 2 and checked[-1].startswith("proof verified")
                else:
                    with pytest.raises(ZkProofRefusedError, match="scores"):
                        await stream.finish()
        finally:
            await driver.close()

    asyncio.run(run())
