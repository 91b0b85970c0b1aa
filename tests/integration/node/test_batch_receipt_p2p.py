"""The ``batch_receipt`` op over real libp2p streams: two tiny-Llama workers in their own processes
serve a job opened with a broker's tickets; the broker's P2P batch signer gets each node's
signature over the Merkle root of the receipts it signed, and is refused, by name, a root over an
altered receipt or for another broker."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from pathlib import Path

import pytest
from eth_account import Account
from node_helpers import MODEL, Swarm, driver_settings, tiny_shards, wait_for_spans  # type: ignore[import-not-found]

from dlis_market.broker.backend import BatchSigningRequest
from dlis_market.broker.p2p_backend import P2PBatchSigner
from dlis_market.chain.job_market import BatchReceipt, merkle_root, receipt_leaf, receipt_signer
from dlis_market.chain.typed_data import recover_typed
from dlis_market.errors import BrokerError
from dlis_market.node.driver import JobSpec, PipelineDriver

BROKER = Account.from_key(secrets.token_bytes(32))  # signs the tickets: the workers run in open mode
BATCH = secrets.token_bytes(32)


def test_workers_sign_batch_roots_only_over_their_own_receipts_for_their_broker(tmp_path: Path) -> None:
    shards = tiny_shards(tmp_path, [(0, 3), (3, 6)], name=MODEL)
    with Swarm(tmp_path / "swarm") as swarm:
        swarm.start_workers([(shards, "0:3", "a"), (shards, "3:6", "b")])

        async def run() -> None:
            driver = await PipelineDriver.create(swarm.initial_peers, driver_settings(), bytes(BROKER.key))
            try:
                await wait_for_spans(driver, MODEL, 2)
                jobs = [
                    await driver.generate(JobSpec(MODEL, [1, 2, 3], 3, job_id=secrets.token_bytes(32)))
                    for _ in range(2)
                ]
                by_peer: dict[str, list] = {}
                for _, stage_receipts in jobs:
                    for r in stage_receipts:
                        by_peer.setdefault(r.peer_id, []).append(r.signed)
                node = {
                    p: receipt_signer(driver.market, rs[0].receipt, rs[0].signature.signature)
                    for p, rs in by_peer.items()
                }
                signer = P2PBatchSigner(driver, asyncio.get_running_loop(), timeout_s=10)
                with pytest.raises(BrokerError, match="not from the event loop"):
                    signer.sign_batches(BROKER.address, BATCH, [])

                def ask(broker: str, peer: str, receipts: list):
                    req = BatchSigningRequest(node[peer], peer, receipts)
                    return asyncio.to_thread(signer.sign_batches, broker, BATCH, [req])

                for peer, receipts in by_peer.items():
                    answers = await ask(BROKER.address, peer, receipts)
                    assert not answers.refusals, answers.refusals
                    want = BatchReceipt(
                        node[peer],
                        BROKER.address,
                        BATCH,
                        merkle_root([receipt_leaf(r.receipt) for r in receipts]),
                        sum(r.receipt.amount for r in receipts),
                        2,
                    )
                    sig = answers.signatures[node[peer]]
                    assert recover_typed(driver.market, "BatchReceipt", want.message(), sig) == node[peer]

                    # the broker raises the second receipt's amount: refused, naming it
                    higher = dataclasses.replace(receipts[1].receipt, amount=receipts[1].receipt.amount + 1)
                    altered = [receipts[0], dataclasses.replace(receipts[1], receipt=higher)]
                    refused = await ask(BROKER.address, peer, altered)
                    assert not refused.signatures
                    assert "receipt 1 of 2" in refused.refusals[node[peer]]
                    assert "is not one this node signed" in refused.refusals[node[peer]]

                    # another broker asks for a root over these sessions' receipts: refused
                    other = Account.create().address
                    refused = await ask(other, peer, receipts)
                    assert f"opened by broker {BROKER.address}, not by {other}" in refused.refusals[node[peer]]

                # a node that cannot be reached is reported, not waited on forever
                quick = P2PBatchSigner(driver, asyncio.get_running_loop(), timeout_s=2)
                gone = BatchSigningRequest(Account.create().address, None, by_peer[next(iter(by_peer))])
                answers = await asyncio.to_thread(quick.sign_batches, BROKER.address, BATCH, [gone])
                assert answers.refusals == {gone.node: "no peer id on NodeRegistry: cannot be reached"}
            finally:
                await driver.close()

        asyncio.run(run())
