"""A stage's signed fingerprint of its call, as the driver checks it with every receipt: written
as the stage that would like to be paid without committing (none sent, someone else's key, a
fingerprint moved to another receipt, tampered bytes, one covering fewer tokens than billed)."""

from __future__ import annotations

import dataclasses
import secrets

import pytest
import torch
from eth_account import Account

from dlis_market.chain.job_market import market_domain
from dlis_market.node import receipts
from dlis_market.node.errors import ReceiptError
from dlis_market.protocol.fingerprints import FingerprintBuilder

DOMAIN = market_domain(31337, "0x" + "11" * 20)
NODE = Account.from_key(secrets.token_bytes(32))


def served(tokens: int, steps: list[int]) -> tuple[receipts.SignedReceipt, bytes]:
    """A session that ran ``steps`` (tokens per step) and its fingerprint of what it sent."""
    ledger = receipts.ReceiptLedger(secrets.token_bytes(32), b"\x02" * 32, 0, 10, 10**12)
    builder = FingerprintBuilder()
    gen = torch.Generator().manual_seed(tokens)
    for n in steps:
        rows = torch.randn(n, 64, generator=gen)
        ledger.record(n, rows.numpy().tobytes())
        builder.add(rows)
    return receipts.sign(ledger, bytes(NODE.key), DOMAIN), builder.finish().to_bytes()


def test_a_commitment_verifies_and_travels_with_the_receipt() -> None:
    signed, fingerprint = served(7, [5, 1, 1])
    wire = receipts.to_wire(signed) | receipts.commit(bytes(NODE.key), DOMAIN, signed.receipt, fingerprint).to_wire()
    back = receipts.Commitment.from_wire(wire)
    fp = receipts.verify_commitment(DOMAIN, receipts.from_wire(wire).receipt, back, NODE.address)
    assert (fp.num_tokens, fp.hidden_size) == (7, 64)
    assert len(back.fingerprint) < 7 * 64 * 2  # a few bytes per token, not the activations


def test_bills_without_a_true_commitment_are_refused() -> None:
    signed, fingerprint = served(7, [5, 1, 1])
    commitment = receipts.commit(bytes(NODE.key), DOMAIN, signed.receipt, fingerprint)

    with pytest.raises(ReceiptError, match="carries no activation fingerprint"):
        receipts.Commitment.from_wire(receipts.to_wire(signed))  # an old or altered worker sends none
    stranger = receipts.commit(bytes(Account.create().key), DOMAIN, signed.receipt, fingerprint)
    with pytest.raises(ReceiptError, match="not by the stage's node key"):
        receipts.verify_commitment(DOMAIN, signed.receipt, stranger, NODE.address)
    other, _ = served(7, [7])  # a commitment made for another receipt (another job) is not this one's
    with pytest.raises(ReceiptError, match=r"signed for another receipt.*forged or altered"):
        receipts.verify_commitment(DOMAIN, other.receipt, commitment, NODE.address)
    tampered = dataclasses.replace(commitment, fingerprint=fingerprint[:-2] + bytes([fingerprint[-2] ^ 1, 0]))
    with pytest.raises(ReceiptError, match="forged or altered"):
        receipts.verify_commitment(DOMAIN, signed.receipt, tampered, NODE.address)
    with pytest.raises(ReceiptError, match="does not parse"):
        receipts.verify_commitment(DOMAIN, signed.receipt, dataclasses.replace(commitment, signature=b"\x00"),
                                   NODE.address)  # fmt: skip

    # a stage billing 9 tokens that fingerprints only 7 of them (skipping the rest) is refused
    _, short = served(7, [5, 1, 1])
    ledger = receipts.ReceiptLedger(signed.receipt.job_id, b"\x02" * 32, 0, 10, 10**12)
    ledger.record(9, b"rows")
    billed = receipts.sign(ledger, bytes(NODE.key), DOMAIN)
    partial = receipts.commit(bytes(NODE.key), DOMAIN, billed.receipt, short)
    with pytest.raises(ReceiptError, match="covers 7 tokens but the receipt bills 9"):
        receipts.verify_commitment(DOMAIN, billed.receipt, partial, NODE.address)
    garbage = receipts.commit(bytes(NODE.key), DOMAIN, billed.receipt, b"\x01" * 40)
    with pytest.raises(ReceiptError, match="do not parse"):
        receipts.verify_commitment(DOMAIN, billed.receipt, garbage, NODE.address)
