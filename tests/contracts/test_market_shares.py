"""JobMarket shared ranges: one layer range served by a group of nodes together, each billing its
own share with its own receipt (two share workers computing a client's first layer on additive
secret shares; later a tensor-parallel group).

The rule, the same in all three settlement paths (``settleBatch``, ``settleBatchMerkle``,
``settleJob``): a stage after the first may repeat exactly the previous stage's range (same start
and end) when its signer is strictly greater, as an address, than the previous stage's signer, so a
group's members come in ascending address order and no node bills one range twice in a job
(``JobMarketShareOrder`` otherwise). Any other repeat or overlap keeps the coverage rule
(``JobMarketInvalidRange``). Each share is credited to its own node (or forfeited) as any receipt,
and the shares' total stays within the client's maxCost.

NODES[0] (op1) < NODES[1] (op2) < NODES[2] (op2) as addresses.
"""

import pytest
from conftest import (
    FEE_BPS,
    MODEL_LAYERS,
    NODES,
    UNIT,
    batch_id,
    make_job,
    reverts,
    settle,
    settle_merkle,
    settle_solo,
    settlement_state,
)

from dlis_market.chain.typed_data import job_id

pytestmark = pytest.mark.usefixtures("live")
A, B, C = 3 * UNIT, 2 * UNIT, 5 * UNIT
SHARE_END = 1  # the group serves the client's first layer [0, 1)
PATHS = ["batch", "merkle", "solo"]
N0, N1, N2 = (n.address for n in NODES[:3])
assert int(N0, 16) < int(N1, 16) < int(N2, 16)  # the order the tests below rely on


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    pass


def _settle(path: str, market, broker, tag: str, jobs):
    if path == "batch":
        return settle(market, broker, tag, jobs)
    if path == "merkle":
        return settle_merkle(market, broker, tag, jobs)
    assert len(jobs) == 1
    return settle_solo(market, broker, jobs[0])


def _batch_id(path: str, market, tag: str, jid: bytes) -> str:
    """The batch id a path's PaymentCredited events carry."""
    return market.soloBatchId(jid) if path == "solo" else "0x" + batch_id(tag).hex()


def _job(market, roles, nonce: int, stages, **kw):
    """A job of client1 for roles["broker"]; ``stages`` are (node index, start, end, amount)."""
    c1, broker = roles["client1"], roles["broker"]
    return make_job(market, c1, broker, nonce, [(NODES[n], s, e, amt) for n, s, e, amt in stages], **kw)


def _state(market, token, roles) -> list:
    return settlement_state(market, token, roles, nonces=4)


def _fee(cost: int) -> int:
    return cost * FEE_BPS // 10_000


# ----------------------------------------------------------------------------- shares settle


@pytest.mark.parametrize("path", PATHS)
def test_two_shares_of_the_first_layer_settle_and_each_is_credited(path, market, token, roles):
    """[0, 1) billed by NODES[0] (op1) and NODES[1] (op2), each its own receipt, the rest
    [1, 30) by NODES[2] (op2): the job settles, the client pays all three receipts plus fee, each
    node is credited its own amount with the events of any receipt."""
    c1, broker, op1, op2, treasury = roles["client1"], roles["broker"], roles["op1"], roles["op2"], roles["treasury"]
    stages = [(0, 0, SHARE_END, A), (1, 0, SHARE_END, B), (2, SHARE_END, MODEL_LAYERS, C)]
    before = _state(market, token, roles)
    tx = _settle(path, market, broker, "two-shares", [_job(market, roles, 1, stages)])
    jid = job_id(str(c1), 1)
    cost = A + B + C
    fee = _fee(cost)
    assert dict(tx.events["JobSettled"][0]) == {"jobId": "0x" + jid.hex(), "client": c1, "cost": cost, "fee": fee}
    bid = _batch_id(path, market, "two-shares", jid)
    assert [dict(e) for e in tx.events["PaymentCredited"]] == [
        {"payee": op1, "node": N0, "batchId": bid, "amount": A},
        {"payee": op2, "node": N1, "batchId": bid, "amount": B},
        {"payee": op2, "node": N2, "batchId": bid, "amount": C},
    ]
    assert "ReceiptForfeited" not in tx.events
    if path == "solo":
        assert "BatchSettled" not in tx.events
    else:
        ev = tx.events["BatchSettled"][0]
        assert (ev["jobs"], ev["paid"], ev["fees"]) == (1, cost, fee)
    after = _state(market, token, roles)
    assert after[0] == before[0] - cost - fee  # client1's escrow for the broker
    assert (market.claimableOf(op1), market.claimableOf(op2), market.claimableOf(treasury)) == (A, B + C, fee)
    assert market.nonceUsed(c1, 1)
    assert token.balanceOf(market) == market.totalEscrow() + market.totalClaimable()


@pytest.mark.parametrize("path", PATHS)
def test_a_group_of_three_shares_settles(path, market, token, roles):
    """All three nodes share [0, 1) in ascending order; NODES[0] then also serves [1, 30) alone
    (a node may serve another range of the same job)."""
    c1, broker, op1, op2 = roles["client1"], roles["broker"], roles["op1"], roles["op2"]
    stages = [(0, 0, SHARE_END, A), (1, 0, SHARE_END, B), (2, 0, SHARE_END, C), (0, SHARE_END, MODEL_LAYERS, UNIT)]
    tx = _settle(path, market, broker, "three-shares", [_job(market, roles, 1, stages)])
    cost = A + B + C + UNIT
    ev = tx.events["JobSettled"][0]
    assert (ev["cost"], ev["fee"]) == (cost, _fee(cost))
    credited = {}
    for e in tx.events["PaymentCredited"]:
        credited[e["node"]] = credited.get(e["node"], 0) + e["amount"]
    assert credited == {N0: A + UNIT, N1: B, N2: C}
    assert (market.claimableOf(op1), market.claimableOf(op2)) == (A + UNIT, B + C)
    assert market.escrowOf(c1, broker) == 1_000 * UNIT - cost - _fee(cost)


@pytest.mark.parametrize("path", PATHS)
def test_a_shared_middle_range_settles(path, market, roles):
    """A group may share any range, not only the first: [10, 20) by all three nodes."""
    broker = roles["broker"]
    stages = [(2, 0, 10, A), (0, 10, 20, B), (1, 10, 20, B), (2, 10, 20, B), (0, 20, MODEL_LAYERS, C)]
    tx = _settle(path, market, broker, "middle", [_job(market, roles, 1, stages)])
    assert tx.events["JobSettled"][0]["cost"] == A + 3 * B + C
    assert (market.claimableOf(roles["op1"]), market.claimableOf(roles["op2"])) == (B + C, A + 2 * B)


@pytest.mark.parametrize("path", ["batch", "merkle"])
def test_share_jobs_in_one_batch_are_checked_per_job(path, market, roles):
    """Two share jobs in one batch: the order restarts with each job (NODES[1] may lead the
    second job's group after closing the first's), and each node's shares are aggregated."""
    c1, c2, broker = roles["client1"], roles["client2"], roles["broker"]
    first = make_job(market, c1, broker, 1, [(NODES[0], 0, 1, A), (NODES[1], 0, 1, B), (NODES[2], 1, 30, C)])
    second = make_job(market, c2, broker, 1, [(NODES[1], 0, 1, A), (NODES[2], 0, 1, B), (NODES[0], 1, 30, C)])
    tx = _settle(path, market, broker, "two-jobs", [first, second])
    assert len(tx.events["JobSettled"]) == 2
    assert (market.claimableOf(roles["op1"]), market.claimableOf(roles["op2"])) == (A + C, B + C + A + B)


def test_a_share_of_a_node_no_longer_routable_is_forfeited(market, registry, roles):
    """Forfeits are per receipt, as for any stage: NODES[1] deregistered after serving its share
    is not paid and its share not charged; the other share and the rest are paid."""
    c1, broker = roles["client1"], roles["broker"]
    registry.deregisterNode(N1, {"from": roles["op2"]})
    stages = [(0, 0, SHARE_END, A), (1, 0, SHARE_END, B), (2, SHARE_END, MODEL_LAYERS, C)]
    for path, nonce in zip(PATHS, (1, 2, 3), strict=True):
        tx = _settle(path, market, broker, f"forfeit-{path}", [_job(market, roles, nonce, stages)])
        jid = "0x" + job_id(str(c1), nonce).hex()
        assert [dict(e) for e in tx.events["ReceiptForfeited"]] == [{"jobId": jid, "node": N1, "amount": B}]
        assert tx.events["JobSettled"][0]["cost"] == A + C
    assert (market.claimableOf(roles["op1"]), market.claimableOf(roles["op2"])) == (3 * A, 3 * C)


# ----------------------------------------------------------------------------- order and ranges


@pytest.mark.parametrize("path", PATHS)
def test_the_same_node_billing_a_range_twice_is_refused(path, market, token, roles):
    broker = roles["broker"]
    before = _state(market, token, roles)
    twice = [(0, 0, SHARE_END, A), (0, 0, SHARE_END, A), (2, SHARE_END, MODEL_LAYERS, C)]
    with reverts("JobMarketShareOrder", 0, 1, N0, N0):
        _settle(path, market, broker, "twice", [_job(market, roles, 1, twice)])
    # also when the repeat bills another amount (another receipt, the same signer)
    twice = [(2, 0, SHARE_END, A), (2, 0, SHARE_END, B), (0, SHARE_END, MODEL_LAYERS, C)]
    with reverts("JobMarketShareOrder", 0, 1, N2, N2):
        _settle(path, market, broker, "twice", [_job(market, roles, 1, twice)])
    assert _state(market, token, roles) == before
    assert not market.batchSettled(broker, batch_id("twice"))


@pytest.mark.parametrize("path", PATHS)
def test_shares_in_descending_order_are_refused(path, market, token, roles):
    broker = roles["broker"]
    before = _state(market, token, roles)
    down = [(1, 0, SHARE_END, B), (0, 0, SHARE_END, A), (2, SHARE_END, MODEL_LAYERS, C)]
    with reverts("JobMarketShareOrder", 0, 1, N0, N1):
        _settle(path, market, broker, "down", [_job(market, roles, 1, down)])
    # the third member of a group compared with the second, not the first
    zigzag = [(0, 0, SHARE_END, A), (2, 0, SHARE_END, C), (1, 0, SHARE_END, B), (0, SHARE_END, MODEL_LAYERS, C)]
    with reverts("JobMarketShareOrder", 0, 2, N1, N2):
        _settle(path, market, broker, "down", [_job(market, roles, 1, zigzag)])
    assert _state(market, token, roles) == before


@pytest.mark.parametrize(
    "stages, bad",
    [
        ([(0, 0, 2, A), (1, 0, 1, B), (2, 1, 30, C)], (0, 1, 0, 1, 2)),  # same start, shorter
        ([(0, 0, 1, A), (1, 0, 2, B), (2, 2, 30, C)], (0, 1, 0, 2, 1)),  # same start, longer
        ([(0, 0, 2, A), (1, 1, 2, B), (2, 2, 30, C)], (0, 1, 1, 2, 2)),  # same end, later start
        ([(0, 0, 10, A), (1, 10, 20, B), (2, 0, 10, C)], (0, 2, 0, 10, 20)),  # an earlier stage's range
        ([(0, 0, 10, A), (1, 10, 30, B), (2, 10, 31, C)], (0, 2, 10, 31, 30)),  # past the last layer
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_a_repeat_that_is_not_exactly_the_previous_range_is_refused(path, market, token, roles, stages, bad):
    """Only an exact repeat of the previous stage's range is a share: a partial overlap, or a
    repeat of a range before the previous one, is the coverage error it always was; the exact
    repeat by the same nodes settles."""
    broker = roles["broker"]
    before = _state(market, token, roles)
    with reverts("JobMarketInvalidRange", *bad):
        _settle(path, market, broker, "overlap", [_job(market, roles, 1, stages)])
    assert _state(market, token, roles) == before
    exact = [(0, 0, 1, A), (1, 0, 1, B), (2, 1, MODEL_LAYERS, C)]
    assert _settle(path, market, broker, "exact", [_job(market, roles, 1, exact)]).status == 1


@pytest.mark.parametrize("path", PATHS)
def test_the_shares_total_is_bounded_by_max_cost(path, market, token, roles):
    """Every share is billed: cost + fee over all of them must stay within maxCost."""
    broker = roles["broker"]
    stages = [(0, 0, SHARE_END, A), (1, 0, SHARE_END, B), (2, SHARE_END, MODEL_LAYERS, C)]
    total = A + B + C + _fee(A + B + C)
    before = _state(market, token, roles)
    with reverts("JobMarketCostExceedsAuthorization", 0, total, total - 1):
        _settle(path, market, broker, "over", [_job(market, roles, 1, stages, max_cost=total - 1)])
    assert _state(market, token, roles) == before
    tx = _settle(path, market, broker, "exact", [_job(market, roles, 1, stages, max_cost=total)])
    assert tx.events["JobSettled"][0]["cost"] == A + B + C
    assert market.escrowOf(roles["client1"], broker) == 1_000 * UNIT - total
