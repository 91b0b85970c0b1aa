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
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from eth_account import Account
from web3 import Web3

from dlis_market.broker.zk_onchain import RECORD_KIND, ProofRecorder
from dlis_market.chain.job_market import Receipt, SignedReceipt, sign_receipt
from dlis_market.chain.typed_data import typed_digest
from dlis_market.protocol.outbox import Outbox, sqlite_url
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.zk_claims import ZkClaim, sign_stage_proof
from tests.integration.zk_helpers import ProvenHead, proven_head

NODE = Account.from_key(b"\x41" * 32)
STRANGER = Account.from_key(b"\x42" * 32)


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> ProvenHead:
    return proven_head(tmp_path_factory.mktemp("zk-records"), tokens=1)


def stage_receipt(market, head: ProvenHead, job: bytes, claim_key=NODE) -> StageReceipt:
    domain = market.market().domain()
    output = np.asarray(head.tokens, dtype="<i8").tobytes()
    r = Receipt(job, b"\x42" * 32, 1, 2, 6, hashlib.sha256(output).digest(), 10**15)
    signed = SignedReceipt(r, sign_receipt(NODE.key, domain, r))
    claim = sign_stage_proof(claim_key.key, domain, r, head.proof, head.key.vk_hash)
    return StageReceipt(NODE.address, signed, proof=ZkClaim(head.proof, claim, b"", 1))


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
    return market.stage_proofs().proof_of(market.market().domain(), receipt.signed)


def proven_events(market) -> list:
    registry = market.stage_proofs().contract
    return list(registry.events.StageProven().get_logs(from_block=0))


def test_a_verified_proof_is_recorded_once_and_registers_its_circuit(market, head: ProvenHead, tmp_path: Path):
    receipt = stage_receipt(market, head, b"\x01" * 32)

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
    assert record is not None and record.node == NODE.address and record.vk_hash == head.key.vk_hash
    assert len(proven_events(market)) == 1
    verifier, vocab, _, _ = market.stage_proofs().circuit_of(head.key.vk_hash)
    assert int(verifier, 16) != 0 and vocab == 16  # registered by the broker with the verifier it deployed
    assert (head.key.vk_path.parent / "vka.bin").exists()


def test_a_proof_queued_while_the_chain_is_down_is_recorded_after_a_restart(market, head: ProvenHead, tmp_path):
    receipt = stage_receipt(market, head, b"\x02" * 32)
    live = market.client.w3.provider

    async def chain_down() -> None:
        rec = recorder(market, tmp_path)
        market.client.w3.provider = Web3.HTTPProvider("http://127.0.0.1:9")  # nothing listens there
        try:
            rec.start()
            await rec.submit(receipt, head.key, head.tokens)  # persisted, then one try that cannot reach the chain
            await asyncio.sleep(0.6)  # a retry or two, also refused
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


def test_a_proof_the_chain_refuses_stays_a_dead_letter_with_the_reason(market, head: ProvenHead, tmp_path: Path):
    receipt = stage_receipt(market, head, b"\x03" * 32, claim_key=STRANGER)  # the claim is not the node's

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
