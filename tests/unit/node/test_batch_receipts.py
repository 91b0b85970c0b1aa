"""A stage signs a Merkle batch receipt only over receipts it signed itself, for the broker whose
ticket opened their sessions: written as the broker that would like more (a forged or altered
leaf, a receipt of another broker's session, a receipt listed twice, a flood of receipts)."""

from __future__ import annotations

import dataclasses
import secrets

import pytest
from eth_account import Account

from dlis_market.chain.job_market import BatchReceipt, market_domain, merkle_root, receipt_leaf
from dlis_market.chain.typed_data import recover_typed
from dlis_market.node.errors import ReceiptError
from dlis_market.node.receipts import (
    MAX_BATCH_RECEIPTS,
    ReceiptLedger,
    SignedReceipts,
    from_wire,
    sign,
    sign_batch,
    to_wire,
)

DOMAIN = market_domain(31337, "0x" + "11" * 20)
NODE = Account.from_key(secrets.token_bytes(32))
BROKER = Account.create().address
OTHER_BROKER = Account.create().address
BATCH = secrets.token_bytes(32)


def _served(store: SignedReceipts, tokens: int, broker: str = BROKER, now: float = 0.0) -> dict:
    """A session served ``tokens`` and closed: the stage signs its receipt and keeps its leaf."""
    ledger = ReceiptLedger(secrets.token_bytes(32), b"\x02" * 32, 0, 10, 10**12, broker=broker)
    ledger.record(tokens, secrets.token_bytes(16))
    signed = sign(ledger, bytes(NODE.key), DOMAIN)
    store.put(signed, broker, now=now)
    return to_wire(signed)


def _sign(store: SignedReceipts, wire: list[dict], broker: str = BROKER, now: float = 1.0) -> dict:
    return sign_batch(store, bytes(NODE.key), DOMAIN, NODE.address, broker, BATCH, wire, now=now)


def test_signs_the_root_the_contract_rebuilds_over_its_own_receipts() -> None:
    store = SignedReceipts(max_entries=100, max_age_s=60)
    wire = [_served(store, t) for t in (5, 7, 9)]
    answer = _sign(store, wire)
    receipts = [from_wire(w).receipt for w in wire]
    want = BatchReceipt(
        NODE.address,
        BROKER,
        BATCH,
        merkle_root([receipt_leaf(r) for r in receipts]),
        sum(r.amount for r in receipts),
        3,
    )
    assert (answer["root"], int(answer["total"]), answer["count"]) == (want.root, want.total, want.count)
    assert recover_typed(DOMAIN, "BatchReceipt", want.message(), answer["signature"]) == NODE.address


def test_refuses_a_batch_with_an_altered_receipt_naming_it() -> None:
    """The broker raises one receipt's amount: that leaf was never signed, so no root is signed."""
    store = SignedReceipts(max_entries=100, max_age_s=60)
    wire = [_served(store, t) for t in (5, 7, 9)]
    altered = dict(wire[1], amount=str(int(wire[1]["amount"]) + 1))
    with pytest.raises(ReceiptError, match=r"receipt 1 of 3 .* amount 7000000000001\) is not one this node signed"):
        _sign(store, [wire[0], altered, wire[2]])
    forged = dict(wire[0], job_id=secrets.token_bytes(32))  # a job this node never served
    with pytest.raises(ReceiptError, match="receipt 0 of 1"):
        _sign(store, [forged])


def test_refuses_a_broker_other_than_the_one_that_opened_the_sessions() -> None:
    store = SignedReceipts(max_entries=100, max_age_s=60)
    mine = _served(store, 5)
    theirs = _served(store, 6, broker=OTHER_BROKER)
    with pytest.raises(ReceiptError, match=f"receipt 1 of 2 .* opened by broker {OTHER_BROKER}, not by {BROKER}"):
        _sign(store, [mine, theirs])
    with pytest.raises(ReceiptError, match=f"opened by broker {BROKER}, not by {OTHER_BROKER}"):
        _sign(store, [mine], broker=OTHER_BROKER)
    assert _sign(store, [theirs], broker=OTHER_BROKER)["count"] == 1  # its own broker may


def test_refuses_duplicates_empty_and_oversized_batches() -> None:
    store = SignedReceipts(max_entries=100, max_age_s=60)
    one = _served(store, 5)
    with pytest.raises(ReceiptError, match="listed twice"):
        _sign(store, [one, one])
    with pytest.raises(ReceiptError, match="1 to 4096 receipts; got 0"):
        _sign(store, [])
    with pytest.raises(ReceiptError, match=f"got {MAX_BATCH_RECEIPTS + 1}"):
        _sign(store, [one] * (MAX_BATCH_RECEIPTS + 1))
    with pytest.raises(ReceiptError, match="batch id must be 32 bytes"):
        sign_batch(store, bytes(NODE.key), DOMAIN, NODE.address, BROKER, b"\x01", [one])


def test_kept_leaves_are_bounded_in_count_and_age() -> None:
    store = SignedReceipts(max_entries=2, max_age_s=10)
    wire = [_served(store, t, now=float(i)) for i, t in enumerate((5, 6, 7))]
    assert len(store) == 2
    with pytest.raises(ReceiptError, match=r"receipt 0 of 1 .* older than the 10 s / 2 receipts kept"):
        _sign(store, [wire[0]], now=3)  # pushed out by the count
    assert _sign(store, [wire[1], wire[2]], now=3)["count"] == 2
    with pytest.raises(ReceiptError, match="not one this node signed"):
        _sign(store, [wire[1]], now=11.5)  # aged out
    assert _sign(store, [wire[2]], now=11.5)["count"] == 1


def test_a_receipt_put_again_is_kept_once() -> None:
    store = SignedReceipts(max_entries=10, max_age_s=60)
    ledger = ReceiptLedger(secrets.token_bytes(32), b"\x02" * 32, 0, 10, 10**12, broker=BROKER)
    ledger.record(3, b"x")
    signed = sign(ledger, bytes(NODE.key), DOMAIN)
    store.put(signed, BROKER, now=0)
    store.put(dataclasses.replace(signed), BROKER, now=1)
    assert len(store) == 1
