"""A stage keeps the receipts of sessions whose opener vanished, bounded in count and age."""

from __future__ import annotations

import secrets

from eth_account import Account

from dlis_market.chain.job_market import market_domain
from dlis_market.node.receipts import ReceiptLedger, UnclaimedReceipts, from_wire, sign, verify_receipt

DOMAIN = market_domain(31337, "0x" + "11" * 20)
KEY = Account.from_key(secrets.token_bytes(32))


def _signed(job: bytes, tokens: int = 5):
    ledger = ReceiptLedger(job, b"\x02" * 32, 0, 10, 10**12)
    ledger.record(tokens, b"out")
    return sign(ledger, bytes(KEY.key), DOMAIN)


def test_kept_receipts_come_back_by_job_signed_by_the_stage() -> None:
    store = UnclaimedReceipts(max_entries=10, max_age_s=60)
    a, b = secrets.token_bytes(32), secrets.token_bytes(32)
    store.put(_signed(a, 5), now=0)
    store.put(_signed(a, 9), now=1)
    store.put(_signed(b, 3), now=2)
    got = [from_wire(w) for w in store.get(a, now=3)]
    assert [r.receipt.tokens for r in got] == [5, 9]
    for r in got:
        verify_receipt(DOMAIN, r, KEY.address)
        assert r.receipt.amount == 10**12 * r.receipt.tokens
    assert store.get(secrets.token_bytes(32), now=3) == []


def test_oldest_go_first_over_the_count_and_after_the_age() -> None:
    store = UnclaimedReceipts(max_entries=2, max_age_s=10)
    jobs = [secrets.token_bytes(32) for _ in range(3)]
    for i, job in enumerate(jobs):
        store.put(_signed(job), now=i)
    assert store.get(jobs[0], now=3) == [] and len(store.get(jobs[2], now=3)) == 1  # over the count
    assert store.get(jobs[1], now=11.5) == [] and len(store.get(jobs[2], now=11.5)) == 1  # jobs[1] aged out
    assert store.get(jobs[2], now=13) == []
