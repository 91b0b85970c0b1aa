"""LoRA adapters served over P2P workers: fetched by CID from a real IPFS node on a session's
first use, checked, applied on the fly per session, named in the receipts and re-run by spot
checks; against PEFT's merged model on one process.

Layout (tiny Llama, fp32, 4 layers): ``a`` [0, 2); ``b`` and its replica ``b2`` [2, 4). Workers
run without a chain here (no registry: the adapter's model id is not checked on chain; that
check is covered with Anvil in tests/integration/broker/test_adapter_jobs.py).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from eth_account import Account
from peft import PeftModel
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "storage"))
from node_helpers import Swarm, _wait_ready, driver_settings, run_pinned_job, tiny_fp32_shards, wait_for_spans

from dlis_market.broker.spot_checks import SpotChecker
from dlis_market.chain.typed_data import Domain
from dlis_market.cli.model_adapter import check_adapter
from dlis_market.inference.adapter_training import train_tiny_adapter
from dlis_market.node.driver import PipelineDriver
from dlis_market.node.errors import RemoteError
from dlis_market.node.protocol import OpenBody
from dlis_market.protocol.adapters import AdapterRef
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spot_checks import FingerprintCheckPass, SpotCheckEvidence, SpotCheckFailure, SpotCheckSampler
from dlis_market.storage.adapter_store import publish_adapter
from dlis_market.storage.client import KuboClient
from dlis_market.storage.daemon import DaemonConfig, EmbeddedDaemon

MODEL = "tiny-lora"
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7]]
NEW = 6
ADAPTER_MODEL_ID = b"\x0a" * 32  # no chain here: the id receipts must name


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("adapter-swarm")
    model_dir, shards = tiny_fp32_shards(root, MODEL, split=2, layers=4)
    adapter_dir = root / "qv"
    train_tiny_adapter(model_dir, adapter_dir, r=4, steps=4, seed=3)
    ipfs = EmbeddedDaemon(DaemonConfig(repo=root / "ipfs", request_timeout_s=30))
    info = ipfs.start()
    try:

        async def publish() -> Any:
            async with KuboClient(info.api_url) as kubo:
                return await publish_adapter(kubo, adapter_dir, check_adapter(adapter_dir, shards, "qv"))

        record = asyncio.run(publish())
        ref = AdapterRef(name=f"{MODEL}:qv", model_id=ADAPTER_MODEL_ID, cid=record.cid, adapter_id=record.adapter_id)
        env = {"DLIS_STORAGE__KUBO_API_URL": info.api_url}
        with Swarm(root / "swarm") as sw:
            workers = {
                "a": sw.launch(shards, "0:2", "a", env=env),
                "b": sw.launch(shards, "2:4", "b", env=env),
                "b2": sw.launch(shards, "2:4", "b2", env=env),
            }
            for w in workers.values():
                w.info = _wait_ready(w.proc, 240, w.log_path)
            yield {"swarm": sw, "workers": workers, "ref": ref, "model_dir": model_dir, "adapter_dir": adapter_dir}
    finally:
        ipfs.stop(timeout_s=10)


def hop(w: Any) -> RouteHop:
    return RouteHop(w.peer_id, w.info["node_address"], w.info["start"], w.info["end"], 10**12)


def greedy(model: torch.nn.Module, prompt: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, min_new_tokens=new)
    return [int(t) for t in out[0, len(prompt) :]]


class Verdicts:
    """Collects what spot checks send (no oracle needed: every outcome here must be a pass)."""

    def __init__(self) -> None:
        self.evidence: list[SpotCheckEvidence] = []
        self.passes: list[FingerprintCheckPass] = []

    async def submit(self, evidence: SpotCheckEvidence) -> dict[str, Any]:
        self.evidence.append(evidence)
        same = evidence.accused_output.data == evidence.checker_output.data
        return {"outcome": "pass" if same else "mismatch"}

    async def report_failure(self, failure: SpotCheckFailure) -> dict[str, Any]:
        raise AssertionError(f"no stage should withhold anything here: {failure}")

    async def report_fingerprint_pass(self, passed: FingerprintCheckPass) -> dict[str, Any]:
        self.passes.append(passed)
        return {"recorded": True}


def test_a_job_names_an_adapter_and_every_stage_applies_it(world: dict[str, Any]) -> None:
    w, ref = world["workers"], world["ref"]
    base = AutoModelForCausalLM.from_pretrained(world["model_dir"], dtype=torch.float32).eval()
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(world["model_dir"], dtype=torch.float32), world["adapter_dir"]
    ).merge_and_unload().eval()  # fmt: skip

    async def run() -> None:
        driver = await PipelineDriver.create(world["swarm"].initial_peers, driver_settings())
        try:
            await wait_for_spans(driver, MODEL, 3)
            checker = SpotChecker(driver, SpotCheckSampler(1.0, b"k"), bytes(Account.create().key),
                                  Domain("DLIS Oracle", "1", 31337, "0x" + "77" * 20), sink := Verdicts(),
                                  lambda _m: ("fp32", 32), fingerprints=SpotCheckSampler(1.0, b"f"))  # fmt: skip
            differs = 0
            for i, prompt in enumerate(PROMPTS):
                route = [hop(w["a"]), hop(w["b" if i % 2 else "b2"])]
                finished, tokens = await run_pinned_job(driver, MODEL, route, prompt, NEW, adapter=ref)
                assert tokens == greedy(merged, prompt, NEW), i  # PEFT's merged model on one process
                _, plain = await run_pinned_job(driver, MODEL, route, prompt, NEW)  # same workers, no adapter
                assert plain == greedy(base, prompt, NEW), i
                differs += tokens != plain
                # the receipts name the adapter's model id: the job is authorized and settled under it
                assert {r.signed.receipt.model_id for r in finished.receipts.values()} == {ADAPTER_MODEL_ID}
                # spot checks re-run the call with the same adapter: one prefill, then a full replay
                by_fp = await checker.check(finished, [], [1])
                assert [r.outcome for r in by_fp] == ["pass:fingerprint"], by_fp
                replayed = await checker.check(finished, [1])
                assert [r.outcome for r in replayed] == ["pass"], replayed
            assert differs >= 1  # the adapter changes what the model says
            assert len(sink.evidence) == len(sink.passes) == len(PROMPTS)
        finally:
            await driver.close()

    asyncio.run(run())


def test_an_adapter_that_is_not_what_its_id_says_is_refused(world: dict[str, Any]) -> None:
    """A session naming adapter files by a CID whose content is another adapter (or altered) is
    refused before anything is attached; the worker serves base sessions as before."""
    w, ref = world["workers"], world["ref"]
    forged = ref.model_copy(update={"adapter_id": "ab" * 32})

    async def run() -> None:
        driver = await PipelineDriver.create(world["swarm"].initial_peers, driver_settings())
        try:
            await wait_for_spans(driver, MODEL, 3)
            job = b"\x07" * 32
            target = hop(w["b2"])
            body = OpenBody(
                session_id="forged-1", model=MODEL, start=2, end=4, max_length=32, job_id=job,
                reply_to=driver.peer_id, next_peer=None, ticket=driver.ticket(job, MODEL, target),
                adapter=forged.model_dump(),
            )  # fmt: skip
            with pytest.raises(RemoteError, match="hashes to adapter id"):
                await driver.pool.request(target.peer_id, "open", body.wire(), 60)
            other = ref.model_copy(update={"name": "another-model:qv"})
            body = body.model_copy(update={"session_id": "forged-2", "adapter": other.model_dump()})
            with pytest.raises(RemoteError, match="this node serves 'tiny-lora'"):
                await driver.pool.request(target.peer_id, "open", body.wire(), 60)
            _, tokens = await run_pinned_job(driver, MODEL, [hop(w["a"]), target], PROMPTS[0], 3)
            assert len(tokens) == 3
        finally:
            await driver.close()

    asyncio.run(run())
    log = (w["b2"].home / "worker.log").read_text()
    assert f"({forged.adapter_id[:12]})" not in log  # nothing was attached under the forged id
