"""Settlement from the ledger to JobMarket on a real Anvil: exact amounts, crash recovery, no double pay."""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account

from dlis_market.broker.ledger import Ledger, NewJob, NewReceipt
from dlis_market.broker.settlement import Settler
from dlis_market.chain.job_market import JobAuthorization, Receipt, sign_authorization, sign_receipt
from dlis_market.types import model_id
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


def add_completed_job(market, ledger, client, nodes, nonce, amount=UNIT // 50, signer=None):
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
    for i, ((start, end), node) in enumerate(zip(SPANS, nodes, strict=True)):
        r = Receipt(auth.job_id, MID, start, end, 8, secrets.token_bytes(32), amount)
        rs = sign_receipt(node.key, dom, r)
        receipts.append(NewReceipt(i, node.address, start, end, 8, "0x" + r.output_hash.hex(), amount, rs.hex()))
    cost = 3 * amount
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


def test_settles_exactly_the_receipts(setup):
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    jids = [add_completed_job(market, ledger, client, nodes, n) for n in (1, 2, 3)]
    escrow0 = jm.escrow_of(client.address)
    result = Settler(ledger, jm, market.broker).settle_once()
    assert len(result.settled_batches) == 1 and not result.failed_jobs
    cost = 3 * 3 * (UNIT // 50)
    assert jm.escrow_of(client.address) == escrow0 - cost - jm.fee_for(cost)
    for op in ops:
        assert jm.claimable_of(op.address) == 3 * (UNIT // 50)
    for jid in jids:
        assert ledger.get_job(jid).status == "settled"
    batch = ledger.get_batch(result.settled_batches[0])
    assert batch.status == "settled" and batch.tx_hash.startswith("0x")
    assert Settler(ledger, jm, market.broker).settle_once().settled_batches == []  # nothing left


def test_crash_after_send_is_recovered_without_paying_twice(setup, tmp_path):
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    add_completed_job(market, ledger, client, nodes, 10)
    # The broker committed the batch and sent the transaction, then died before recording it.
    jobs = ledger.unsettled_jobs(50)
    batch_id = ledger.create_batch([j.id for j in jobs])
    from dlis_market.broker.settlement import signed_job

    jm.settle_batch(market.broker, bytes.fromhex(batch_id[2:]), [signed_job(j, market.broker.address) for j in jobs])
    paid = jm.claimable_of(ops[0].address)
    # A new broker process on the same database:
    restarted = Settler(Ledger(ledger.url), jm, market.broker)
    result = restarted.settle_once()
    assert result.settled_batches == [batch_id]
    assert jm.claimable_of(ops[0].address) == paid  # not paid again
    assert ledger.get_batch(batch_id).tx_hash is not None


def test_crash_before_send_settles_once_after_restart(setup):
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    add_completed_job(market, ledger, client, nodes, 20)
    batch_id = ledger.create_batch([j.id for j in ledger.unsettled_jobs(50)])  # committed, never sent
    restarted = Settler(Ledger(ledger.url), jm, market.broker)
    assert restarted.settle_once().settled_batches == [batch_id]
    assert jm.claimable_of(ops[1].address) == UNIT // 50
    assert restarted.settle_once().settled_batches == []
    assert jm.claimable_of(ops[1].address) == UNIT // 50


def test_invalid_job_is_dropped_and_the_rest_settle(setup):
    market, ops, nodes, client, ledger = setup
    jm = market.market()
    good = add_completed_job(market, ledger, client, nodes, 30)
    forged = add_completed_job(market, ledger, client, nodes, 31, signer=Account.create())
    result = Settler(ledger, jm, market.broker).settle_once()
    assert result.failed_jobs == [forged]
    assert "JobMarketInvalidClientSignature" in ledger.get_job(forged).error
    assert ledger.get_job(good).status == "settled"
    assert jm.claimable_of(ops[2].address) == UNIT // 50


def test_unroutable_stage_is_held_back_then_settled(setup):
    """A stage's operator drops under the minimum stake after serving: the job waits for later
    passes (its receipts are not forfeited at once) and settles in full when the stake is back;
    close to the deadline it settles as it stands, the unroutable stage's receipt forfeited."""
    from dlis_market.broker.settlement import SETTLE_DEADLINE_MARGIN_S

    market, ops, nodes, client, ledger = setup
    jm, staking = market.market(), market.staking()
    settler = Settler(ledger, jm, market.broker)
    stake = staking.min_stake()
    jid = add_completed_job(market, ledger, client, nodes, 60)
    staking.request_unstake(ops[0], stake)
    for _ in range(2):
        result = settler.settle_once()
        assert result.held_jobs == [jid] and result.settled_batches == [] and not result.failed_jobs
        assert ledger.get_job(jid).status == "completed"
    staking.stake(ops[0], stake)
    assert settler.settle_once().settled_batches
    assert ledger.get_job(jid).status == "settled"
    assert jm.claimable_of(ops[0].address) == UNIT // 50

    late = add_completed_job(market, ledger, client, nodes, 61)
    staking.request_unstake(ops[1], stake)
    assert settler.settle_once().held_jobs == [late]
    market.increase_time(ledger.get_job(late).deadline - market.client.timestamp() - SETTLE_DEADLINE_MARGIN_S + 5)
    result = settler.settle_once()
    assert result.settled_batches and result.held_jobs == []
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
    Settler(ledger, jm, market.broker).settle_once()
    jm.claim(ops[0])
    env = {"DLIS_HOME": str(market.settings.home), "DLIS_CHAIN__RPC_URL": market.settings.chain.rpc_url}
    res = CliRunner().invoke(app, ["node", "earnings", ops[0].address, "--json"], env=env)
    assert res.exit_code == 0, res.output
    import json

    data = json.loads(res.stdout)
    assert data["credited"] == data["claimed"] == str(UNIT // 50) and data["claimable"] == "0"  # uint256 as strings
    assert data["credits"][0]["node"] == nodes[0].address
