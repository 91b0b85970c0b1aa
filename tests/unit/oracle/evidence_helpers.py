"""Synthetic spot-check evidence: two node keys sign receipts (the worker's ReceiptLedger) for the
same stage call with the given outputs."""

from __future__ import annotations

import hashlib

import numpy as np
from eth_account import Account
from eth_account.signers.local import LocalAccount

from dlis_market.chain.job_market import SignedReceipt
from dlis_market.chain.typed_data import Domain
from dlis_market.node.receipts import ReceiptLedger, sign
from dlis_market.protocol.spot_checks import SpotCheckEvidence, build_evidence

JOB = b"\x07" * 32
MODEL = b"\x42" * 32
RUNNER = Account.from_key(b"\x5a" * 32)  # the spot-check runner of the unit tests


def reference_output(n: int = 4 * 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2.0, n).astype(np.float32)


def signed_receipt(key: LocalAccount, domain: Domain, data: bytes, job: bytes = JOB) -> SignedReceipt:
    ledger = ReceiptLedger(job_id=job, model_id=MODEL, start=0, end=8, price_per_token=10**12)
    for row in range(4):  # four decode steps, one output row each
        ledger.record(1, data[row * len(data) // 4 : (row + 1) * len(data) // 4])
    return sign(ledger, key.key, domain)


def make_evidence(
    accused: LocalAccount,
    checker: LocalAccount,
    domain: Domain,
    accused_out: np.ndarray,
    checker_out: np.ndarray,
    shard_dtype: str = "fp32",
    job: bytes = JOB,
    runner: LocalAccount = RUNNER,
    oracle_domain: Domain | None = None,
    referee: tuple[LocalAccount, np.ndarray] | None = None,
    row_width: int = 0,
) -> SpotCheckEvidence:
    """``oracle_domain`` defaults to the receipts' domain renamed (unit tests); pass the real one."""
    a_bytes, c_bytes = accused_out.astype("<f4").tobytes(), checker_out.astype("<f4").tobytes()
    r_bytes = referee[1].astype("<f4").tobytes() if referee else None
    return build_evidence(
        signed_receipt(accused, domain, a_bytes, job),
        signed_receipt(checker, domain, c_bytes, job),
        a_bytes,
        c_bytes,
        "float32",
        shard_dtype,  # type: ignore[arg-type]
        hashlib.sha256(b"stage input").digest(),
        domain,
        runner.key,
        oracle_domain or Domain("DLIS Oracle", "1", domain.chain_id, domain.verifying_contract),
        signed_receipt(referee[0], domain, r_bytes, job) if referee and r_bytes else None,
        r_bytes,
        row_width=row_width,
    )
