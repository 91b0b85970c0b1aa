"""``settleJob``'s calldata, built by the binding from a job as the broker keeps it: each stage
packed in one word (the contract's ``SignedStage``), refused before sending when an amount does not
fit the packing; and its batch id, the one JobMarket credits under and the broker's ledger uses."""

from __future__ import annotations

import dataclasses
import secrets

import pytest
from eth_account import Account
from eth_utils import keccak

from dlis_market.broker.ledger import batch_id_for
from dlis_market.chain.errors import PreflightError
from dlis_market.chain.job_market import (
    JobAuthorization,
    Receipt,
    SignedJob,
    SignedReceipt,
    market_domain,
    sign_authorization,
    sign_receipt,
    single_job_args,
    solo_batch_id,
)

DOMAIN = market_domain(31337, "0x" + "22" * 20)


def _job(amounts: list[int]) -> SignedJob:
    client, broker = Account.create(), Account.create()
    auth = JobAuthorization(client.address, broker.address, b"\x01" * 32, 10**30, 7, 99)
    receipts = []
    for i, amount in enumerate(amounts):
        r = Receipt(auth.job_id, auth.model_id, 10 * i, 10 * i + 10, 64 + i, secrets.token_bytes(32), amount)
        receipts.append(SignedReceipt(r, sign_receipt(Account.create().key, DOMAIN, r)))
    return SignedJob(auth, sign_authorization(client.key, DOMAIN, auth), receipts)


def test_stages_pack_into_one_word_each_like_the_contract():
    job = _job([1, 2**128 - 1, 12345])
    args = single_job_args(job)
    assert args[:7] == job.as_tuple()[:7]  # authorization and its signature as settleBatch takes them
    for (packed, out, r, vs), s in zip(args[7], job.receipts, strict=True):
        rec = s.receipt
        assert packed >> 224 == 0  # bits 255-224 unused
        assert (packed >> 192 & 0xFFFFFFFF, packed >> 160 & 0xFFFFFFFF, packed >> 128 & 0xFFFFFFFF) == (
            rec.start,
            rec.end,
            rec.tokens,
        )
        assert packed & (2**128 - 1) == rec.amount
        assert (out, r, vs) == (rec.output_hash, s.signature.r, s.signature.vs)


def test_amount_past_the_packing_is_refused_before_sending():
    job = _job([1, 2, 3])
    big = dataclasses.replace(job.receipts[1].receipt, amount=2**128)
    job = SignedJob(job.authorization, job.signature, [job.receipts[0], SignedReceipt(big, job.receipts[1].signature)])
    with pytest.raises(PreflightError, match=r"stage 1 bills 340282366920938463463374607431768211456: .*settle_batch"):
        single_job_args(job)


def test_solo_batch_id_is_the_ledgers_batch_of_one():
    job_id = secrets.token_bytes(32)
    assert solo_batch_id(job_id) == keccak(job_id)
    assert batch_id_for(["0x" + job_id.hex()]) == "0x" + solo_batch_id(job_id).hex()
