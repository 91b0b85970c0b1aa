"""A privacy=high job's share pair: who may be the second share worker (``planning.share_partner``)
and which share receipts a job settles with (``job_types.covering_receipts``)."""

from __future__ import annotations

import pytest
from eth_account import Account

from dlis_market.broker.errors import Unroutable, UpstreamFailed
from dlis_market.broker.job_types import covering_receipts
from dlis_market.broker.planning import NodeStanding, share_partner
from dlis_market.chain.job_market import Receipt, SignedReceipt, sign_receipt
from dlis_market.chain.typed_data import Domain
from dlis_market.protocol.receipts import StageReceipt
from dlis_market.protocol.routes import RouteHop
from dlis_market.protocol.spans import SpanRecord

ATT = "0x" + "ab" * 32
NODES = [f"0x{i:040x}" for i in range(1, 9)]


def offer(i: int, start: int = 0, end: int = 2, price: int = 10, throughput: float = 5.0, **kw) -> SpanRecord:
    return SpanRecord(model="m", start=start, end=end, peer_id=f"peer{i}", node_address=NODES[i],
                      throughput=throughput, free_slots=kw.pop("free_slots", 4), queue_length=0,
                      price_per_token=price, attestation_hash=ATT, **kw)  # fmt: skip


def standing(operators: dict[str, str], **overrides: NodeStanding):
    def lookup(node: str) -> NodeStanding:
        return overrides.get(node, NodeStanding(True, 10_000, ATT, operators.get(node, "")))

    return lookup


def first() -> RouteHop:
    return RouteHop.of(offer(0))


def test_the_partner_is_the_cheapest_eligible_first_stage_worker_of_another_operator() -> None:
    ops = {NODES[0]: "op-a", NODES[1]: "op-a", NODES[2]: "op-b", NODES[3]: "op-c", NODES[4]: "op-d"}
    offers = [
        offer(0),
        offer(1, price=1),  # the same operator as the first: together they could rebuild the activations
        offer(2, price=9),
        offer(3, price=3, start=0, end=3),  # not exactly the first stage
        offer(4, price=9, throughput=9.0),  # as cheap as 2, faster
    ]
    assert share_partner(offers, first(), standing(ops), 5000).node == NODES[4]
    # not staked, reputed below the floor, attested otherwise than registered, or without a free slot
    bad = {
        NODES[4]: NodeStanding(False, 10_000, ATT, "op-d"),
        NODES[2]: NodeStanding(True, 100, ATT, "op-b"),
    }
    with pytest.raises(Unroutable, match="two workers of different operators"):
        share_partner(offers, first(), standing(ops, **bad), 5000)
    unattested = {NODES[4]: NodeStanding(True, 10_000, "0x" + "00" * 32, "op-d")}
    assert share_partner(offers, first(), standing(ops, **unattested), 5000).node == NODES[2]
    full = [o if o.node_address != NODES[4] else offer(4, price=9, throughput=9.0, free_slots=0) for o in offers]
    assert share_partner(full, first(), standing(ops), 5000).node == NODES[2]


def test_a_replacement_is_no_dearer_than_the_worker_it_replaces() -> None:
    ops = {NODES[0]: "op-a", NODES[2]: "op-b", NODES[3]: "op-c"}
    offers = [offer(0), offer(2, price=12), offer(3, price=11)]
    assert share_partner(offers, first(), standing(ops), 0).node == NODES[3]
    with pytest.raises(Unroutable):
        share_partner(offers, first(), standing(ops), 0, max_price=10)
    assert share_partner(offers, first(), standing(ops), 0, max_price=11).node == NODES[3]


DOMAIN = Domain("JobMarket", "1", 31337, "0x" + "11" * 20)
KEYS = sorted((Account.create() for _ in range(4)), key=lambda a: int(a.address, 16))


def receipt(key, start: int, end: int, share: bool = False, session: str = "s") -> StageReceipt:
    r = Receipt(b"\x01" * 32, b"\x02" * 32, start, end, 5, b"\x03" * 32, 50)
    signed = SignedReceipt(r, sign_receipt(key.key, DOMAIN, r))
    return StageReceipt(key.address, signed, session_id=session, share=share)


def test_share_receipts_lead_in_ascending_node_address_then_the_route() -> None:
    high, low, mid, last = KEYS[3], KEYS[0], KEYS[1], KEYS[2]
    got = [receipt(mid, 2, 4), receipt(last, 4, 6), receipt(high, 0, 2, True), receipt(low, 0, 2, True)]
    out = covering_receipts(got, 6)
    assert [(r.node, r.start, r.share) for r in out] == [
        (low.address, 0, True), (high.address, 0, True), (mid.address, 2, False), (last.address, 4, False)
    ]  # fmt: skip
    # a share worker that withheld its receipt forfeits its own pay only: the job still settles
    assert [r.node for r in covering_receipts(got[:3], 6)] == [high.address, mid.address, last.address]
    # shares over two ranges, or not from layer 0, are refused
    with pytest.raises(UpstreamFailed, match="one range"):
        covering_receipts([*got, receipt(KEYS[0], 0, 3, True)], 6)
    with pytest.raises(UpstreamFailed, match="one range"):
        covering_receipts([receipt(low, 2, 4, True), receipt(high, 2, 4, True), receipt(last, 4, 6)], 6)
