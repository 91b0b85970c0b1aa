"""A broker with ``zk.record_on_chain`` records each verified head proof on chain through its
persisted outbox (broker/zk_onchain.py): the first proof of a circuit deploys the verifier and
registers the circuit, a proof delivered twice is recorded once, a proof queued while the chain
is down is recorded after the broker restarts, and a proof the chain refuses stays a dead letter
with the contract's reason. Real EZKL proof, the test's own Anvil, a SQLite outbox file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from dlis_market.broker.zk_onchain import RECORD_KIND, ProofRecorder
from dlis_market.chain.job_market import Receipt, SignedReceipt, sign_receipt
from dlis_market.chain.typed_data import typed_digest
from dlis_market.oracle.zk_verify import StageVerifyingKey
from dlis_market.protocol.outbox import Outbox, sqlite_url
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.zk_claims import ZkClaim, sign_stage_proof
from dlis_market.types import model_id, name_hash
from tests.integration.zk_helpers import ProvenHead, proven_head

STRANGER = Account.from_key(b"\x42" * 32)


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> ProvenHead:
    return proven_head(tmp_path_factory.mktemp("zk-records"), tokens=1)


@pytest.fixture()
def node(market) -> LocalAccount:
    """A registered, staked last-stage node of the 2-layer model "zk-head" (published here)."""
    fn = market.registry().contract.functions.publishModel(name_hash("zk-head"), "QmHead", b"\x02" * 32, 2)
    market.client.transact(market.deployer, fn)
    return market.enroll_node(market.new_funded_account(500 * 10**18))


def stage_receipt(market, head: ProvenHead, node: LocalAccount, job: bytes, claim_key=None) -> StageReceipt:
    domain = market.market().domain()
    output = np.asarray(head.tokens, dtype="<i8").tobytes()
    model = bytes.fromhex(model_id("zk-head", market.deployer.address)[2:])
    r = Receipt(job, model, 1, 2, 6, hashlib.sha256(output).digest(), 10**15)
    signed = SignedReceipt(r, sign_receipt(node.key, domain, r))
    claim = sign_stage_proof((claim_key or node).key, domain, r, head.proof, head.key.vk_hash)
    return StageReceipt(node.address, signed, proof=ZkClaim(head.proof, claim, b"", 1))


def recorder(market, tmp_path: Path) -> ProofRecorder:
    outbox = Outbox(sqlite_url(tmp_path / "zk-records.db"), retry_base_s=0.2, retry_max_s=0.5)
    return ProofRecorder(market.client, market.broker, outbox, tmp_path / "zk-cache")


@contextlib.asynccontextmanager
async def running(market, tmp_path: Path) -> AsyncIterator[ProofRecorder]:
    """A recorder whose outbox loop runs (what a broker with zk.record_on_chain starts), then stops."""
    rec = recorder(market, tmp_path)
    rec.start()
    try:
        yield rec
    finally:
        await rec.close()


async def drained(rec: ProofRecorder, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while await rec.outbox.pending(RECORD_KIND):
        assert asyncio.get_running_loop().time() < deadline, await rec.outbox.pending(RECORD_KIND)
        await asyncio.sleep(0.1)


def recorded(market, receipt: StageReceipt):
    return market.stage_proofs().proof_of(market.market().domain(), receipt.signed, receipt.node)


def proven_events(market) -> list:
    registry = market.stage_proofs().contract
    return list(registry.events.StageProven().get_logs(from_block=0))


def test_a_verified_proof_is_recorded_once_and_registers_its_circuit(market, head, node, tmp_path: Path):
    receipt = stage_receipt(market, head, node, b"\x01" * 32)

    async def run() -> None:
        async with running(market, tmp_path) as rec:
            await rec.submit(receipt, head.key, head.tokens)
            await drained(rec)
            # delivered again (a crash between the chain's receipt and the row's delete): no second record
            await rec.submit(receipt, head.key, head.tokens)
            await drained(rec)
            assert await rec.outbox.dead_letters(RECORD_KIND) == []

    asyncio.run(run())
    record = recorded(market, receipt)
    assert record is not None and record.node == node.address and record.vk_hash == head.key.vk_hash
    assert len(proven_events(market)) == 1
    circuit = market.stage_proofs().circuit_of(head.key.vk_hash)  # registered by the broker, its verifier deployed
    assert circuit is not None and circuit.vocab == 16 and circuit.registrar == market.broker.address
    assert circuit.model_id == receipt.signed.receipt.model_id


def test_a_proof_queued_while_the_chain_is_down_is_recorded_after_a_restart(market, head, node, tmp_path):
    receipt = stage_receipt(market, head, node, b"\x02" * 32)
    live = market.client.w3.provider

    async def chain_down() -> None:
        rec = recorder(market, tmp_path)
        market.client.w3.provider = Web3.HTTPProvider("http://127.0.0.1:9")  # nothing listens there
        try:
            rec.start()
            await rec.submit(receipt, head.key, head.tokens)  # persisted; the loop's tries cannot reach the chain
            await asyncio.sleep(0.6)
            pending = await rec.outbox.pending(RECORD_KIND)
            assert len(pending) == 1 and pending[0].attempts >= 1, pending
        finally:
            market.client.w3.provider = live
            await rec.close()

    async def restarted() -> None:
        async with running(market, tmp_path) as rec:  # the same outbox file: the row an earlier run left
            await drained(rec)

    asyncio.run(chain_down())
    assert recorded(market, receipt) is None
    asyncio.run(restarted())
    assert recorded(market, receipt) is not None


def test_a_proof_the_chain_refuses_stays_a_dead_letter_with_the_reason(market, head, node, tmp_path: Path):
    receipt = stage_receipt(market, head, node, b"\x03" * 32, claim_key=STRANGER)  # the claim is not the node's

    async def run() -> list:
        async with running(market, tmp_path) as rec:
            await rec.submit(receipt, head.key, head.tokens)
            await drained(rec)
            return await rec.outbox.dead_letters(RECORD_KIND)

    dead = asyncio.run(run())
    assert len(dead) == 1 and "StageProofRegistryClaimNotBound" in dead[0].last_error, dead
    assert recorded(market, receipt) is None
    digest = typed_digest(market.market().domain(), "Receipt", receipt.signed.receipt.message())
    assert all(bytes(e["args"]["receiptDigest"]) != digest for e in proven_events(market))


def test_a_proof_whose_circuit_was_set_up_again_is_a_dead_letter(market, head, node, tmp_path: Path) -> None:
    """The queued row names the key hash the proof was verified with; a circuit set up again since
    (other key files) is never registered in its place."""
    folder = tmp_path / "circuit"
    shutil.copytree(head.key.vk_path.parent, folder)
    key = StageVerifyingKey(folder / "settings.json", folder / "vk.key", head.key.srs_path)
    assert key.vk_hash == head.key.vk_hash  # read now, as when the broker verified the proof
    (folder / "vk.key").write_bytes(b"another set-up")
    receipt = stage_receipt(market, head, node, b"\x04" * 32)

    async def run() -> list:
        async with running(market, tmp_path) as rec:
            await rec.submit(receipt, key, head.tokens)
            await drained(rec)
            return await rec.outbox.dead_letters(RECORD_KIND)

    dead = asyncio.run(run())
    assert len(dead) == 1 and "set up again" in dead[0].last_error, dead
    assert recorded(market, receipt) is None
    assert market.stage_proofs().circuit_of(head.key.vk_hash) is None  # nothing registered from other files
