"""JobMarket.settleBatchMerkle: one signed BatchReceipt per node over the Merkle root of its stages.

Exact accounting (every node paid its leaves, every client charged its receipts plus fee, the same
as the per-receipt path), the per-job checks kept (client signature, nonce, coverage, maxCost,
escrow), and the attacks of a broker or node against the batch receipts: a forged root, a receipt
replayed across batches, a node claiming a job it did not serve, a total that does not match the
leaves. Each attack is refused with a named error and leaves the market untouched.
"""

from dataclasses import replace

import pytest
from conftest import (
    FEE_BPS,
    MIN_STAKE,
    MODEL_LAYERS,
    NODE_KEYS,
    NODES,
    UNIT,
    batch_id,
    make_job,
    merkle_jobs,
    register,
    resign,
    reverts,
    settle,
    settle_merkle,
    settlement_state,
    sign_batch,
    stake,
    two_stage,
)
from conftest import three_stage as conftest_three_stage
from eth_utils import keccak

from dlis_market.chain.job_market import (
    MerkleJob,
    Receipt,
    merkle_proof,
    merkle_root,
    receipt_leaf,
    verify_merkle_proof,
)
from dlis_market.chain.typed_data import job_id, type_hash

pytestmark = pytest.mark.usefixtures("live")
A, B = 3 * UNIT, 2 * UNIT
COST = A + B
FEE = COST * FEE_BPS // 10_000


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    pass


def three_stage(market, client, broker, nonce: int, a: int = A, **kw):
    return conftest_three_stage(market, client, broker, nonce, (a, a + 1, a + 2), **kw)


def state(market, token, roles) -> list:
    return settlement_state(market, token, roles, nonces=10)


# ----------------------------------------------------------------------------- exact accounting


def test_merkle_batch_pays_exactly_what_per_receipt_settlement_pays(market, token, roles):
    """The same six jobs (amounts differing per job) settled once per path move exactly the same
    money: escrow debits, operator credits, treasury fee; every nonce is used."""
    c1, c2, broker = roles["client1"], roles["client2"], roles["broker"]
    per_receipt = [three_stage(market, c, broker, n, a=(n + 1) * UNIT) for c in (c1, c2) for n in (0, 1, 2)]
    merkle = [three_stage(market, c, broker, n, a=(n - 2) * UNIT) for c in (c1, c2) for n in (3, 4, 5)]
    before = state(market, token, roles)
    settle(market, broker, "per-receipt", per_receipt)
    mid = state(market, token, roles)
    tx = settle_merkle(market, broker, "merkle", merkle)
    after = state(market, token, roles)
    delta_1 = [b - a for a, b in zip(before[:9], mid[:9], strict=True)]
    delta_2 = [b - a for a, b in zip(mid[:9], after[:9], strict=True)]
    assert delta_1 == delta_2
    cost = sum(3 * n * UNIT + 3 for n in (1, 2, 3))  # per client
    fee_total = 2 * sum((3 * n * UNIT + 3) * FEE_BPS // 10_000 for n in (1, 2, 3))
    assert delta_2[0] == delta_2[1] == -(cost + sum((3 * n * UNIT + 3) * FEE_BPS // 10_000 for n in (1, 2, 3)))
    assert delta_2[2] == 2 * sum(n * UNIT for n in (1, 2, 3))  # op1: NODES[0]
    assert delta_2[3] == 2 * sum(2 * n * UNIT + 3 for n in (1, 2, 3))  # op2: NODES[1] and NODES[2]
    assert delta_2[4] == fee_total
    assert all(after[9:15]) and all(after[19:25])  # nonces 0..5 of both clients used
    assert len(tx.events["JobSettled"]) == 6
    paid = {(e["payee"], e["node"]): e["amount"] for e in tx.events["PaymentCredited"]}
    assert paid[(roles["op1"], NODES[0].address)] == 2 * (1 + 2 + 3) * UNIT
    ev = tx.events["BatchSettled"][0]
    assert (ev["jobs"], ev["paid"], ev["fees"]) == (6, 2 * cost, fee_total)
    # the batch id is not stored (the nonces are the replay guard); BatchSettled is the record
    assert not market.batchSettled(broker, batch_id("merkle"))
    assert market.totalEscrow() + market.totalClaimable() == token.balanceOf(market)


def test_python_root_and_proofs_match_the_chain(market, roles):
    """The root the contract rebuilt is the one Python built (the batch settles with it), and
    every leaf proves into it with OpenZeppelin's MerkleProof rule, for odd and even leaf counts."""
    c1, broker = roles["client1"], roles["broker"]
    for count in (1, 2, 5):
        jobs = merkle_jobs(market, [three_stage(market, c1, broker, 10 * count + i) for i in range(count)])
        signed = sign_batch(market, broker, batch_id(f"proofs-{count}"), jobs)
        settle_merkle(market, broker, f"proofs-{count}", jobs, signed)
        leaves = [receipt_leaf(r) for j in jobs for n, r in j.stages if n == NODES[0].address]
        root = signed[NODES[0].address].receipt.root
        assert root == merkle_root(leaves)
        for i, leaf in enumerate(leaves):
            assert verify_merkle_proof(leaf, merkle_proof(leaves, i), root)
        assert not verify_merkle_proof(keccak(b"other"), merkle_proof(leaves, 0), root)


def test_leaf_is_the_receipt_struct_hash(market, roles):
    rc = Receipt(job_id(str(roles["client1"]), 1), b"\x11" * 32, 0, 12, 64, b"\x22" * 32, 5)
    from eth_abi import encode

    types = ["bytes32", "bytes32", "bytes32", "uint32", "uint32", "uint32", "bytes32", "uint256"]
    values = [type_hash("Receipt"), rc.job_id, rc.model_id, 0, 12, 64, rc.output_hash, 5]
    assert receipt_leaf(rc) == keccak(encode(types, values))
    assert bytes(market.BATCH_RECEIPT_TYPEHASH()) == type_hash("BatchReceipt")
    assert bytes(market.PAYMENT_TICKET_TYPEHASH()) == type_hash("PaymentTicket")


def test_forfeited_node_signs_but_is_not_paid_nor_charged(market, token, staking, roles):
    """op1 unstakes below the minimum after NODES[0] served: its receipts are forfeited (evidence
    events), the client pays only the other stages, op2 is paid."""
    c1, broker = roles["client1"], roles["broker"]
    staking.requestUnstake(staking.activeStake(roles["op1"]) - MIN_STAKE + 1, {"from": roles["op1"]})
    before = state(market, token, roles)
    tx = settle_merkle(market, broker, "forfeit", [three_stage(market, c1, broker, 1)])
    after = state(market, token, roles)
    cost = (A + 1) + (A + 2)
    assert before[0] - after[0] == cost + cost * FEE_BPS // 10_000
    assert after[2] == before[2]  # op1 unpaid
    assert after[3] - before[3] == cost
    ev = tx.events["ReceiptForfeited"][0]
    assert (ev["node"], ev["amount"]) == (NODES[0].address, A)


# ----------------------------------------------------------------------------- per-job checks kept


def test_per_job_checks_are_kept(market, token, roles):
    c1, broker = roles["client1"], roles["broker"]
    before = state(market, token, roles)
    forged = three_stage(market, c1, broker, 1, client_key=keccak(text="not-the-client"))
    with reverts("JobMarketInvalidClientSignature", 1, c1):
        settle_merkle(market, broker, "bad-client", [three_stage(market, c1, broker, 0), forged])
    with reverts("JobMarketCostExceedsAuthorization", 0):
        settle_merkle(market, broker, "over", [three_stage(market, c1, broker, 0, max_cost=COST)])
    short = make_job(market, c1, broker, 0, [(NODES[0], 0, 10, A), (NODES[1], 10, 20, B)])
    with reverts("JobMarketIncompleteCoverage", 0, 20, MODEL_LAYERS):
        settle_merkle(market, broker, "short", [short])
    with reverts("JobMarketInsufficientEscrow", 0, c1, broker):
        settle_merkle(market, broker, "poor", [three_stage(market, c1, broker, 0, a=400 * UNIT)])
    assert state(market, token, roles) == before


def test_a_settled_job_cannot_settle_again_through_either_path(market, token, roles):
    """Replay of a job across batches and paths: refused on its nonce, with genuine fresh batch
    receipts of every node."""
    c1, broker = roles["client1"], roles["broker"]
    job = three_stage(market, c1, broker, 1)
    settle_merkle(market, broker, "first", [job])
    before = state(market, token, roles)
    with reverts("JobMarketJobAlreadySettled", 1, c1, 1):
        settle_merkle(market, broker, "again", [three_stage(market, c1, broker, 2), job])
    with reverts("JobMarketJobAlreadySettled", 0, c1, 1):
        settle(market, broker, "again-per-receipt", [job])
    assert state(market, token, roles) == before


# ----------------------------------------------------------------------------- attacks on batch receipts


def _batch(market, roles, tag: str, count: int = 2):
    c1, broker = roles["client1"], roles["broker"]
    jobs = merkle_jobs(market, [three_stage(market, c1, broker, i) for i in range(count)])
    return jobs, sign_batch(market, broker, batch_id(tag), jobs)


def test_forged_root_is_refused(market, token, roles):
    """The broker raises NODES[1]'s amount in one job and rebuilds that node's root and total to
    match, keeping the node's signature: the signature does not cover the forged root."""
    broker = roles["broker"]
    jobs, signed = _batch(market, roles, "forged-root")
    n1 = NODES[1].address
    j0 = jobs[0]
    stages = [(n, replace(r, amount=r.amount + UNIT) if n == n1 else r) for n, r in j0.stages]
    forged_jobs = [MerkleJob(j0.authorization, j0.signature, tuple(stages)), jobs[1]]
    leaves = [receipt_leaf(r) for j in forged_jobs for n, r in j.stages if n == n1]
    honest = signed[n1]
    forged_receipt = replace(honest.receipt, root=merkle_root(leaves), total=honest.receipt.total + UNIT)
    forged = dict(signed, **{n1: replace(honest, receipt=forged_receipt)})
    before = state(market, token, roles)
    with reverts("JobMarketInvalidBatchSignature", 1, n1):
        settle_merkle(market, broker, "forged-root", forged_jobs, forged)
    assert state(market, token, roles) == before


def test_batch_receipt_replayed_in_another_batch_is_refused(market, token, roles):
    """A node's batch receipt binds the batch id and the broker: signed for batch A, it is
    refused in batch B with the same jobs, and for another broker."""
    broker = roles["broker"]
    jobs, signed = _batch(market, roles, "batch-a")
    before = state(market, token, roles)
    with reverts("JobMarketInvalidBatchSignature", 0, NODES[0].address):
        settle_merkle(market, broker, "batch-b", jobs, signed)
    assert state(market, token, roles) == before
    settle_merkle(market, broker, "batch-a", jobs, signed)  # where it belongs it settles


def test_node_claiming_a_job_it_did_not_serve_is_refused(market, token, roles):
    """NODES[0] signs a root that also holds a leaf for a stage NODES[1] served: the leaves the
    batch gives NODES[0] rebuild another root (count kept honest), or the count is off (count
    raised too)."""
    broker = roles["broker"]
    jobs, signed = _batch(market, roles, "unserved")
    n0, n1 = NODES[0].address, NODES[1].address
    mine = [receipt_leaf(r) for j in jobs for n, r in j.stages if n == n0]
    stolen = next(r for n, r in jobs[0].stages if n == n1)
    claimed_root = merkle_root([*mine, receipt_leaf(stolen)])
    honest = signed[n0].receipt
    before = state(market, token, roles)
    lying = resign(market, NODE_KEYS[n0], replace(honest, root=claimed_root))
    with reverts("JobMarketBatchRootMismatch", 0, n0, honest.root, claimed_root):
        settle_merkle(market, broker, "unserved", jobs, dict(signed, **{n0: lying}))
    padded = replace(honest, root=claimed_root, count=honest.count + 1, total=honest.total + stolen.amount)
    lying = resign(market, NODE_KEYS[n0], padded)
    with reverts("JobMarketBatchCountMismatch", 0, n0, honest.count, honest.count + 1):
        settle_merkle(market, broker, "unserved", jobs, dict(signed, **{n0: lying}))
    assert state(market, token, roles) == before


def test_total_that_does_not_match_the_leaves_is_refused(market, token, roles):
    """NODES[2] signs a total one unit above its leaves' sum (its own signature, its own leaves)."""
    broker = roles["broker"]
    jobs, signed = _batch(market, roles, "total")
    n2 = NODES[2].address
    honest = signed[n2].receipt
    lying = resign(market, NODE_KEYS[n2], replace(honest, total=honest.total + 1))
    before = state(market, token, roles)
    with reverts("JobMarketBatchTotalMismatch", 2, n2, honest.total, honest.total + 1):
        settle_merkle(market, broker, "total", jobs, dict(signed, **{n2: lying}))
    assert state(market, token, roles) == before


def test_receipt_signed_by_another_key_is_refused(market, token, roles):
    broker = roles["broker"]
    jobs, signed = _batch(market, roles, "impostor")
    n1 = NODES[1].address
    forged = resign(market, keccak(text="impostor"), signed[n1].receipt)
    before = state(market, token, roles)
    with reverts("JobMarketInvalidBatchSignature", 1, n1):
        settle_merkle(market, broker, "impostor", jobs, dict(signed, **{n1: forged}))
    assert state(market, token, roles) == before


def test_malformed_node_lists_are_refused(market, token, registry, staking, roles):
    """A stage naming a node index past the list, a node listed twice, an unregistered node, a
    node the settling broker operates: each refused by name, nothing moves."""
    c1, broker, deployer = roles["client1"], roles["broker"], roles["deployer"]
    jobs, signed = _batch(market, roles, "lists", count=1)
    from dlis_market.chain.job_market import merkle_batch_args

    nodes, tuples = merkle_batch_args(jobs, signed)
    before = state(market, token, roles)
    bad_index = [list(t) for t in tuples]
    packed, out = bad_index[0][7][2]
    bad_index[0][7] = [*bad_index[0][7][:2], ((7 << 224) | (packed & ((1 << 224) - 1)), out)]
    with reverts("JobMarketUnknownBatchNode", 0, 2, 7, 3):
        market.settleBatchMerkle(batch_id("lists"), nodes, [tuple(t) for t in bad_index], {"from": broker})
    with reverts("JobMarketDuplicateBatchNode", 3, NODES[0].address):
        market.settleBatchMerkle(batch_id("lists"), [*nodes, nodes[0]], tuples, {"from": broker})
    unknown = make_job(market, c1, broker, 0, [(NODES[3], 0, MODEL_LAYERS, A)])
    with reverts("JobMarketBatchNodeNotRegistered", 0, NODES[3].address):
        settle_merkle(market, broker, "unknown", [unknown])
    token.transfer(broker, MIN_STAKE, {"from": deployer})
    stake(token, staking, broker, MIN_STAKE)
    register(registry, broker, NODES[3], "peer-broker")
    before = state(market, token, roles)
    with reverts("JobMarketBatchSelfDealing", 0, NODES[3].address, broker):
        settle_merkle(market, broker, "self", [unknown])
    assert state(market, token, roles) == before


def test_only_brokers_settle_and_empty_batches_are_refused(market, roles):
    jobs, signed = _batch(market, roles, "roles", count=1)
    from dlis_market.chain.job_market import merkle_batch_args

    nodes, tuples = merkle_batch_args(jobs, signed)
    with reverts("AccessControlUnauthorizedAccount", roles["stranger"]):
        market.settleBatchMerkle(batch_id("roles"), nodes, tuples, {"from": roles["stranger"]})
    with reverts("JobMarketEmptyBatch"):
        market.settleBatchMerkle(batch_id("roles"), nodes, [], {"from": roles["broker"]})
    two = two_stage(market, roles["client1"], roles["broker"], 0)
    assert settle_merkle(market, roles["broker"], "two", [two]).status == 1
