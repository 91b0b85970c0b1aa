"""Settlement from the ledger to JobMarket on a real Anvil: exact amounts, crash recovery, no double pay.

The settler settles a job alone through ``settleJob`` (its receipts' own signatures, no node asked
to sign anything), batches of two or more through the Merkle path (one batch receipt signed per
node, by the nodes' real keys: ``LocalBatchSigner``), and falls back per receipt for the jobs of
nodes that do not sign."""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account
from eth_utils import keccak

from dlis_market.broker.ledger import Ledger, NewJob
from dlis_market.broker.settlement import Settler, merkle_job, signed_job
from dlis_market.chain.job_market import (
    JobAuthorization,
    Receipt,
    SignedBatchReceipt,
    SignedReceipt,
    batch_receipts,
    sign_authorization,
    sign_batch_receipt,
    sign_receipt,
)
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.types import model_id
from tests.integration.broker.conftest import LocalBatchSigner
from tests.integration.conftest import DEV_PUBLISHER

UNIT = 10**18
MODEL = "smollm2-135m"
MID = bytes.fromhex(model_id(MODEL, DEV_PUBLISHER)[2:])
SPANS = [(0, 10), (10, 20), (20, 30)]


@pytest.fixture()
def setup(market, tmp_path):
    ops = [market.new_funded_account(1000 * UNIT) for _ in range(3)]
    nodes = [market.enroll_node(o) for o in ops]
    market.registry().publish_model(market.deployer, MODEL, "QmManifest", b"\x11" * 32, 30)
    client = market.new_funded_account(100 * UNIT)
    market.market().deposit(client, 10 * UNIT)
    ledger = Ledger(f"sqlite:///{tmp_path / 'broker.db'}")
    return market, ops, nodes, client, ledger


def merkle_settler(market, ledger, nodes, **signer_kw) -> Settler:
    """A settler whose nodes sign batch receipts with their own keys (``signer_kw``: silent, liars)."""
    jm = market.market()
    return Settler(ledger, jm, market.broker, signer=LocalBatchSigner(nodes, jm.domain(), **signer_kw))


def method_of(jm, tx_hash: str) -> str:
    """The JobMarket function a transaction called."""
    fn, _ = jm.contract.decode_function_input(jm.client.w3.eth.get_transaction(tx_hash)["input"])
    return fn.fn_name


def add_completed_job(market, ledger, client, nodes, nonce, amount=UNIT // 50, signer=None, spans=SPANS):
    jm = market.market()
    dom = jm.domain()
    auth = JobAuthorization(client.address, market.broker.address, MID, UNIT, nonce, market.client.timestamp() + 1200)
    sig = sign_authorization((signer or client).key, dom, auth)
    jid = "0x" + auth.job_id.hex()
    ledger.create_job(
        NewJob(
            jid,
            client.address,
            nonce,
            MODEL,
            model_id(MODEL, DEV_PUBLISHER),
            {"prompt": "hi"},
            UNIT,
            auth.deadline,
            sig.hex(),
        )
    )
    receipts = []
    for (start, end), node in zip(spans, nodes, strict=True):
        r = Receipt(auth.job_id, MID, start, end, 8, secrets.token_bytes(32), amount)
        rs = sign_receipt(node.key, dom, r)
        receipts.append(StageReceipt(node.address, SignedReceipt(r, rs)))
    cost = len(spans) * amount
    ledger.complete_job(
        jid,
        answer="ok",
        token_ids=[1],
        prompt_tokens=2,
        receipts=receipts,
        cost=cost,
        fee=jm.fee_for(cost),
        ttft_ms=1.0,
        latency_ms=2.0,
    )
    return jid


@pytest.mark.parametrize("path", ["merkle", "per-receipt"])
def test_settles_exactly_the_receipts(setup, path):
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    jids = [add_completed_job(market, ledger, client, nodes, n) for n in (1, 2, 3)]
    escrow0 = jm.escrow_of(client.address)
    settler = merkle_settler(market, ledger, nodes) if path == "merkle" else Settler(ledger, jm, market.broker)
    result = settler.settle_once()
    assert len(result.settled_batches) == 1 and not result.failed_jobs
    merkle = path == "merkle"
    assert result.merkle_batches == (result.settled_batches if merkle else [])
    cost = 3 * 3 * (UNIT // 50)
    assert jm.escrow_of(client.address) == escrow0 - cost - jm.fee_for(cost)
    for op in ops:
        assert jm.claimable_of(op.address) == 3 * (UNIT // 50)
    for jid in jids:
        assert ledger.get_job(jid).status == "settled"
    batch = ledger.get_batch(result.settled_batches[0])
    assert batch.status == "settled" and batch.tx_hash.startswith("0x")
    assert method_of(jm, batch.tx_hash) == ("settleBatchMerkle" if merkle else "settleBatch")
    assert merkle_settler(market, ledger, nodes).settle_once().settled_batches == []  # nothing left


@pytest.mark.parametrize("path", ["merkle", "per-receipt", "alone"])
def test_a_shared_first_range_pays_both_share_workers(setup, path):
    """A privacy=high job's first stage is billed by two share workers (ascending node address,
    as the ledger holds them from ``covering_receipts``); every path pays each exactly its receipt."""
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    extra_op = market.new_funded_account(1000 * UNIT)
    extra = market.enroll_node(extra_op)
    pair = sorted([nodes[0], extra], key=lambda n: int(n.address, 16))
    payee = {n.address: o for n, o in zip([*nodes, extra], [*ops, extra_op], strict=True)}
    shared = [pair[0], pair[1], nodes[1], nodes[2]]
    spans = [(0, 10), (0, 10), (10, 20), (20, 30)]
    jids = [
        add_completed_job(market, ledger, client, shared, n, spans=spans) for n in range(1, 2 if path == "alone" else 3)
    ]
    claim0 = {n.address: jm.claimable_of(payee[n.address].address) for n in shared}
    signer_nodes = [*nodes, extra]
    settler = (
        Settler(ledger, jm, market.broker) if path == "per-receipt" else merkle_settler(market, ledger, signer_nodes)
    )
    result = settler.settle_once()
    assert len(result.settled_batches) == 1 and not result.failed_jobs, result
    tx = ledger.get_batch(result.settled_batches[0]).tx_hash
    assert (
        method_of(jm, tx) == {"merkle": "settleBatchMerkle", "per-receipt": "settleBatch", "alone": "settleJob"}[path]
    )
    for n in shared:
        assert jm.claimable_of(payee[n.address].address) - claim0[n.address] == len(jids) * (UNIT // 50), n.address
    assert all(ledger.get_job(j).status == "settled" for j in jids)


def test_single_job_settles_alone_through_settle_job(setup):
    """A batch of one job goes through ``settleJob``: no node is asked for a batch receipt, the
    client pays exactly its receipts plus the fee, each operator gets its receipt, and the ledger's
    batch id is the one JobMarket credits under (``soloBatchId(jobId)``). Warm, it costs <= 120k gas."""
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    treasury = market.client.deployment.treasury
    settler = merkle_settler(market, ledger, nodes)
    gas = []
    for nonce in (200, 201):  # the second one warm: operators, nonce word and treasury already written
        jid = add_completed_job(market, ledger, client, nodes, nonce)
        escrow0, treasury0 = jm.escrow_of(client.address), jm.claimable_of(treasury)
        claim0 = [jm.claimable_of(o.address) for o in ops]
        result = settler.settle_once()
        assert result.settled_batches == result.solo_batches == [ledger.get_job(jid).batch_id]
        assert result.merkle_batches == [] and not result.failed_jobs and settler.signer.asked == []
        batch = ledger.get_batch(result.settled_batches[0])
        assert batch.status == "settled" and method_of(jm, batch.tx_hash) == "settleJob"
        assert batch.id == "0x" + keccak(bytes.fromhex(jid[2:])).hex()
        assert jm.contract.functions.soloBatchId(bytes.fromhex(jid[2:])).call() == bytes.fromhex(batch.id[2:])
        row = ledger.get_job(jid)
        cost = 3 * (UNIT // 50)
        assert row.status == "settled" and row.cost == cost and row.fee == jm.fee_for(cost) and not row.error
        assert escrow0 - jm.escrow_of(client.address) == cost + jm.fee_for(cost)
        assert jm.claimable_of(treasury) - treasury0 == jm.fee_for(cost)
        assert [jm.claimable_of(o.address) - c for o, c in zip(ops, claim0, strict=True)] == [UNIT // 50] * 3
        receipt = jm.client.w3.eth.get_transaction_receipt(batch.tx_hash)
        credited = jm.contract.events.PaymentCredited().process_receipt(receipt)
        assert {"0x" + bytes(e["args"]["batchId"]).hex() for e in credited} == {batch.id}
        gas.append(int(receipt["gasUsed"]))
    print(f"broker settleJob gas: first {gas[0]}, warm {gas[1]}")
    assert gas[1] <= 120_000, gas
    assert settler.settle_once().settled_batches == []


def test_single_job_crash_after_send_is_recovered_with_its_forfeit(setup):
    """The broker committed a one-job batch, sent ``settleJob`` and died before recording it.
    JobMarket keeps no batch id for it (``batchSettled`` is false, no ``BatchSettled`` event): the
    restarted broker finds the job's ``JobSettled`` event of its own transaction, marks the job
    settled (not unpayable: a resend would hit ``JobMarketJobAlreadySettled``) with that
    transaction, books the stage JobMarket forfeited, and pays nothing twice."""
    market, ops, nodes, client, ledger = setup
    jm, staking = market.market(), market.staking()
    jid = add_completed_job(market, ledger, client, nodes, 210)
    staking.request_unstake(ops[0], staking.min_stake())  # stage 0 not routable: forfeited at settlement
    (job,) = ledger.unsettled_jobs(50)
    batch_id = ledger.create_batch([job.id])
    sent = jm.settle_job(market.broker, signed_job(job, market.broker.address))
    tx = "0x" + bytes(sent["transactionHash"]).hex()
    assert not jm.batch_settled(market.broker.address, bytes.fromhex(batch_id[2:]))
    assert jm.contract.events.BatchSettled().process_receipt(sent) == ()
    escrow, paid = jm.escrow_of(client.address), [jm.claimable_of(o.address) for o in ops]
    assert paid == [0, UNIT // 50, UNIT // 50]

    restarted = merkle_settler(market, Ledger(ledger.url), nodes)
    result = restarted.settle_once()
    assert result.settled_batches == [batch_id] and not result.failed_jobs
    batch = ledger.get_batch(batch_id)
    assert batch.status == "settled" and batch.tx_hash == tx and batch.block == sent["blockNumber"]
    row = ledger.get_job(jid)
    assert row.status == "settled" and row.cost == 2 * UNIT // 50 and row.fee == jm.fee_for(row.cost)
    assert "forfeited" in row.error and nodes[0].address in row.error
    assert jm.escrow_of(client.address) == escrow and [jm.claimable_of(o.address) for o in ops] == paid
    assert restarted.signer.asked == [] and restarted.settle_once().settled_batches == []


def test_crash_after_send_is_recovered_without_paying_twice(setup, tmp_path):
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    add_completed_job(market, ledger, client, nodes, 10)
    # The broker committed the batch and sent the transaction, then died before recording it.
    jobs = ledger.unsettled_jobs(50)
    batch_id = ledger.create_batch([j.id for j in jobs])
    jm.settle_batch(market.broker, bytes.fromhex(batch_id[2:]), [signed_job(j, market.broker.address) for j in jobs])
    paid = jm.claimable_of(ops[0].address)
    # A new broker process on the same database (it would settle through the Merkle path):
    restarted = merkle_settler(market, Ledger(ledger.url), nodes)
    result = restarted.settle_once()
    assert result.settled_batches == [batch_id]
    assert jm.claimable_of(ops[0].address) == paid  # not paid again
    assert ledger.get_batch(batch_id).tx_hash is not None


def test_crash_before_send_settles_once_after_restart(setup):
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    add_completed_job(market, ledger, client, nodes, 20)
    batch_id = ledger.create_batch([j.id for j in ledger.unsettled_jobs(50)])  # committed, never sent
    restarted = merkle_settler(market, Ledger(ledger.url), nodes)
    assert restarted.settle_once().solo_batches == [batch_id]  # one job: settleJob
    assert jm.claimable_of(ops[1].address) == UNIT // 50
    assert restarted.settle_once().settled_batches == []
    assert jm.claimable_of(ops[1].address) == UNIT // 50


def test_invalid_job_is_dropped_and_the_rest_settle(setup):
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    good = add_completed_job(market, ledger, client, nodes, 30)
    forged = add_completed_job(market, ledger, client, nodes, 31, signer=Account.create())
    good2 = add_completed_job(market, ledger, client, nodes, 32)
    signer = LocalBatchSigner(nodes, jm.domain())
    result = Settler(ledger, jm, market.broker, signer=signer).settle_once()
    assert result.failed_jobs == [forged] and result.merkle_batches == result.settled_batches
    # the nodes signed again over the batch without the forged job (their roots changed)
    assert [n for _, n, _ in signer.asked] == [n.address for n in nodes] * 2
    assert [count for _, _, count in signer.asked] == [3, 3, 3, 2, 2, 2]
    assert "JobMarketInvalidClientSignature" in ledger.get_job(forged).error
    assert ledger.get_job(good).status == ledger.get_job(good2).status == "settled"
    assert jm.claimable_of(ops[2].address) == 2 * UNIT // 50


def test_invalid_job_leaving_one_sends_it_alone(setup):
    """A batch of two whose one job is refused: the other is left alone, so it settles through
    settleJob on its receipts' own signatures (its nodes are not asked to sign again)."""
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    good = add_completed_job(market, ledger, client, nodes, 35)
    forged = add_completed_job(market, ledger, client, nodes, 36, signer=Account.create())
    signer = LocalBatchSigner(nodes, jm.domain())
    result = Settler(ledger, jm, market.broker, signer=signer).settle_once()
    assert result.failed_jobs == [forged] and result.solo_batches == result.settled_batches
    assert result.merkle_batches == [] and [count for _, _, count in signer.asked] == [2, 2, 2]
    assert "JobMarketInvalidClientSignature" in ledger.get_job(forged).error
    row = ledger.get_job(good)
    assert row.status == "settled" and method_of(jm, ledger.get_batch(row.batch_id).tx_hash) == "settleJob"
    assert [jm.claimable_of(o.address) for o in ops] == [UNIT // 50] * 3


def test_unroutable_stage_is_held_back_then_settled(setup):
    """A stage's operator drops under the minimum stake after serving: the job waits for later
    passes (its receipts are not forfeited at once) and settles in full when the stake is back;
    close to the deadline it settles as it stands, the unroutable stage's receipt forfeited."""
    from dlis_market.broker.settlement import SETTLE_DEADLINE_MARGIN_S

    market, ops, nodes, client, ledger = setup
    jm, staking = market.market(), market.staking()
    settler = merkle_settler(market, ledger, nodes)
    stake = staking.min_stake()
    jid = add_completed_job(market, ledger, client, nodes, 60)
    staking.request_unstake(ops[0], stake)
    for _ in range(2):
        result = settler.settle_once()
        assert result.held_jobs == [jid] and result.settled_batches == [] and not result.failed_jobs
        assert ledger.get_job(jid).status == "completed"
    staking.stake(ops[0], stake)
    assert settler.settle_once().solo_batches
    assert ledger.get_job(jid).status == "settled"
    assert jm.claimable_of(ops[0].address) == UNIT // 50

    late = add_completed_job(market, ledger, client, nodes, 61)
    staking.request_unstake(ops[1], stake)
    assert settler.settle_once().held_jobs == [late]
    market.increase_time(ledger.get_job(late).deadline - market.client.timestamp() - SETTLE_DEADLINE_MARGIN_S + 5)
    result = settler.settle_once()
    assert result.settled_batches and result.held_jobs == [] and result.solo_batches == result.settled_batches
    row = ledger.get_job(late)
    assert row.status == "settled" and row.cost == 2 * UNIT // 50 and "forfeited" in row.error
    assert row.fee == jm.fee_for(row.cost)
    assert jm.claimable_of(ops[1].address) == UNIT // 50  # only the first job: the second is forfeited
    assert jm.claimable_of(ops[2].address) == 2 * UNIT // 50


def test_node_earnings_cli_reads_the_chain(setup):
    from typer.testing import CliRunner

    from dlis_market.cli.main import app

    market, ops, nodes, client, ledger = setup
    jm = market.market()
    add_completed_job(market, ledger, client, nodes, 50)
    assert merkle_settler(market, ledger, nodes).settle_once().solo_batches
    jm.claim(ops[0])
    env = {"DLIS_HOME": str(market.settings.home), "DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}
    res = CliRunner().invoke(app, ["node", "earnings", ops[0].address, "--json"], env=env)
    assert res.exit_code == 0, res.output
    import json

    data = json.loads(res.stdout)
    assert data["credited"] == data["claimed"] == str(UNIT // 50) and data["claimable"] == "0"  # uint256 as strings
    assert data["credits"][0]["node"] == nodes[0].address


# ----------------------------------------------------------------------------- Merkle path and its fallback


def _owed(ledger, jids):
    """(node -> amount its receipts bill, client charge) over the given jobs, from the ledger."""
    owed: dict[str, int] = {}
    for jid in jids:
        for r in ledger.get_job(jid).receipts:
            owed[r.node.lower()] = owed.get(r.node.lower(), 0) + r.amount
    return owed


def test_silent_node_sends_its_jobs_per_receipt_and_all_settle_once(setup):
    """Node 3 does not answer: its two jobs leave the batch and settle per receipt in the same
    pass; the other two settle under the nodes' batch roots. Each job once, money conserved."""
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    op3 = market.new_funded_account(1000 * UNIT)
    node3 = market.enroll_node(op3)
    via3 = [nodes[0], nodes[1], node3]
    jids = [add_completed_job(market, ledger, client, nodes, 70), add_completed_job(market, ledger, client, via3, 71)]
    jids += [add_completed_job(market, ledger, client, nodes, 72), add_completed_job(market, ledger, client, via3, 73)]
    escrow0, treasury0 = jm.escrow_of(client.address), jm.claimable_of(market.client.deployment.treasury)
    operator = {n.address.lower(): o for n, o in zip([*nodes, node3], [*ops, op3], strict=True)}
    claim0 = {a: jm.claimable_of(o.address) for a, o in operator.items()}

    settler = merkle_settler(market, ledger, [*nodes, node3], silent=[node3.address])
    result = settler.settle_once()
    assert not result.failed_jobs and len(result.settled_batches) == 2 and len(result.merkle_batches) == 1
    assert list(result.unsigned_nodes) == [node3.address]
    merkle_batch = result.merkle_batches[0]
    per_receipt = next(b for b in result.settled_batches if b != merkle_batch)
    rows = {j: ledger.get_job(j) for j in jids}
    assert {j for j, r in rows.items() if r.batch_id == merkle_batch} == {jids[0], jids[2]}
    assert {j for j, r in rows.items() if r.batch_id == per_receipt} == {jids[1], jids[3]}
    assert all(r.status == "settled" for r in rows.values())
    assert method_of(jm, ledger.get_batch(merkle_batch).tx_hash) == "settleBatchMerkle"
    assert method_of(jm, ledger.get_batch(per_receipt).tx_hash) == "settleBatch"

    # exactly once: each operator credited its receipts, the client charged cost + fee, no more
    owed = _owed(ledger, jids)
    assert {a: jm.claimable_of(o.address) - claim0[a] for a, o in operator.items()} == owed
    cost = sum(owed.values())
    fee = sum(r.fee for r in rows.values())
    assert sum(r.cost for r in rows.values()) == cost and fee == sum(jm.fee_for(r.cost) for r in rows.values())
    assert escrow0 - jm.escrow_of(client.address) == cost + fee
    assert jm.claimable_of(market.client.deployment.treasury) - treasury0 == fee
    # a later pass with node 3 back pays nothing again
    assert merkle_settler(market, ledger, [*nodes, node3]).settle_once().settled_batches == []
    assert escrow0 - jm.escrow_of(client.address) == cost + fee

    # the same settler does not wait on node 3 again for a while: its next job goes per receipt at once
    asked = len(settler.signer.asked)
    later = add_completed_job(market, ledger, client, via3, 74)
    result = settler.settle_once()
    assert result.merkle_batches == [] and result.solo_batches == result.settled_batches
    assert ledger.get_job(later).status == "settled"
    assert "not asked again" in result.unsigned_nodes[node3.address]
    assert settler.signer.asked[asked:] == []  # no node waited on for a batch that cannot go Merkle


def test_no_node_answering_settles_the_whole_batch_per_receipt(setup):
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    jids = [add_completed_job(market, ledger, client, nodes, n) for n in (80, 81)]
    result = merkle_settler(market, ledger, nodes, silent=[n.address for n in nodes]).settle_once()
    assert result.merkle_batches == result.solo_batches == [] and len(result.settled_batches) == 1
    batch = ledger.get_batch(result.settled_batches[0])
    assert [ledger.get_job(j).batch_id for j in jids] == [batch.id] * 2  # under its own id, not split
    assert method_of(jm, batch.tx_hash) == "settleBatch"
    assert [jm.claimable_of(o.address) for o in ops] == [2 * UNIT // 50] * 3


def test_node_signing_another_total_is_left_out(setup):
    """A node answers with a batch receipt over a total one unit higher than its leaves: the
    signature does not verify for the batch's receipt, so its jobs settle per receipt (at their
    receipts' amounts) and the liar gets nothing more."""
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    for n in (90, 91):
        add_completed_job(market, ledger, client, nodes, n)
    result = merkle_settler(market, ledger, nodes, liars=[nodes[1].address]).settle_once()
    assert nodes[1].address in result.unsigned_nodes and "recovers to" in result.unsigned_nodes[nodes[1].address]
    assert result.merkle_batches == [] and len(result.settled_batches) == 1
    assert [jm.claimable_of(o.address) for o in ops] == [2 * UNIT // 50] * 3


def test_merkle_crash_after_send_is_recovered_without_paying_twice(setup):
    """The broker committed the batch, got the nodes' batch receipts, sent settleBatchMerkle, and died
    before recording it. JobMarket keeps no batch id for Merkle batches (batchSettled is false): the
    restarted broker recognizes it by its first job's used nonce and its BatchSettled event, marks it
    settled with that transaction, and pays nothing twice."""
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    jids = [add_completed_job(market, ledger, client, nodes, n) for n in (100, 101)]
    jobs = ledger.unsettled_jobs(50)
    batch_id = ledger.create_batch([j.id for j in jobs])
    bid = bytes.fromhex(batch_id[2:])
    mjobs = [merkle_job(j, signed_job(j, market.broker.address)) for j in jobs]
    keys = {n.address: n.key for n in nodes}
    signed = {
        node: SignedBatchReceipt(want, sign_batch_receipt(keys[node], jm.domain(), want))
        for node, want in batch_receipts(market.broker.address, bid, mjobs).items()
    }
    sent = jm.settle_batch_merkle(market.broker, bid, mjobs, signed)
    tx = "0x" + bytes(sent["transactionHash"]).hex()
    assert not jm.batch_settled(market.broker.address, bid)  # the Merkle path records no batch id
    escrow, paid = jm.escrow_of(client.address), [jm.claimable_of(o.address) for o in ops]

    restarted = merkle_settler(market, Ledger(ledger.url), nodes)
    result = restarted.settle_once()
    assert result.settled_batches == [batch_id] and not result.failed_jobs
    assert ledger.get_batch(batch_id).tx_hash == tx
    assert all(ledger.get_job(j).status == "settled" for j in jids)
    assert jm.escrow_of(client.address) == escrow and [jm.claimable_of(o.address) for o in ops] == paid
    assert restarted.settle_once().settled_batches == []
