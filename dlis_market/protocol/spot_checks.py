"""Spot checks on the wire: which stage calls are drawn, and the evidence and failure statements a
runner signs for the oracle.

**Sampling.** :class:`SpotCheckSampler` selects a stage call ``(job id, start)`` when
``keccak256(secret ++ job_id ++ start) < fraction * 2**256``: a fixed fraction, reproducible by
the runner (the broker) from its secret, unpredictable to workers.

**Evidence** carries both signed receipts, the input hash the runner fed both, both outputs
(:class:`StageOutputBlob`), optionally a referee's, and the runner's EIP-712 signature (oracle
domain); how the oracle judges it is :mod:`dlis_market.oracle.verification`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from eth_account import Account
from eth_keys.exceptions import BadSignature
from eth_keys.exceptions import ValidationError as KeyValidationError
from eth_utils import keccak
from pydantic import Field

from dlis_market.chain.job_market import SignedReceipt, receipt_signer
from dlis_market.chain.typed_data import Domain, recover_typed, sign_typed
from dlis_market.protocol.errors import SpotCheckSecretError
from dlis_market.protocol.outputs import ElementDtype, ShardDtype
from dlis_market.protocol.receipts import Hex32, ReceiptWire
from dlis_market.types import ZERO_ADDRESS, WireModel

SECRET_BYTES = 32


class SpotCheckSampler:
    """Selects a configurable fraction of stage calls, keyed by a secret seed."""

    def __init__(self, fraction: float, secret: bytes) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"spot-check fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction
        self.secret = secret
        self._threshold = int(fraction * 2**256)

    def selected(self, job_id: bytes, start: int) -> bool:
        if self.fraction >= 1.0:
            return True
        draw = int.from_bytes(keccak(self.secret + job_id + start.to_bytes(4, "big")), "big")
        return draw < self._threshold


def load_or_create_secret(path: Path) -> bytes:
    """A sampler key: 32 random bytes created once at ``path``, readable only by its owner, so
    the same calls stay selected across restarts and nobody else can predict them. Created whole
    or not at all (written and fsynced aside, then linked into place), so a crash while creating
    it never leaves a short key behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".tmp-{path.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(SECRET_BYTES))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process created it first: use theirs
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise SpotCheckSecretError(
            f"{path} holds {len(secret)} bytes, not a {SECRET_BYTES}-byte sampler secret (cut short by a crash?); "
            "delete it to draw a new one (the calls selected so far change)"
        )
    return secret


class StageOutputBlob(WireModel):
    """The raw output rows of one stage call (what the receipt's ``outputHash`` is sha256 of)."""

    element_dtype: ElementDtype
    data_hex: str = Field(pattern=r"^(0x)?([0-9a-fA-F]{2})*$")
    row_width: int = Field(default=0, ge=0, lt=2**24)  # values per token (hidden size; 1 for ids)

    @classmethod
    def of(cls, data: bytes, element_dtype: ElementDtype, row_width: int = 0) -> StageOutputBlob:
        return cls(element_dtype=element_dtype, data_hex="0x" + data.hex(), row_width=row_width)

    @property
    def data(self) -> bytes:
        return bytes.fromhex(self.data_hex.removeprefix("0x"))

    def sha256(self) -> bytes:
        return hashlib.sha256(self.data).digest()


class SpotCheckEvidence(WireModel):
    """What the spot-check runner submits (``POST /v1/spot-checks``)."""

    accused_node: str
    checker_node: str
    accused_receipt: ReceiptWire
    checker_receipt: ReceiptWire
    input_hash: str = Hex32  # sha256 of the stage input both were given (attested by the runner)
    shard_dtype: ShardDtype
    accused_output: StageOutputBlob
    checker_output: StageOutputBlob
    # Optional second checker: a mismatch counts only if it agrees with the checker (2 of 3).
    referee_node: str | None = None
    referee_receipt: ReceiptWire | None = None
    referee_output: StageOutputBlob | None = None
    runner: str = Field(default=ZERO_ADDRESS, pattern=r"^0x[0-9a-fA-F]{40}$")  # who signed (claimed)
    runner_signature: str = Field(default="", pattern=r"^(0x[0-9a-fA-F]{130})?$")

    def runner_message(self) -> dict[str, Any]:
        """Everything a verdict depends on: addresses, the call, every output's hash (the referee's
        is the hash of the blob carried, so a referee output cannot ride along unsigned), and how
        each output is decoded and cut into tokens."""
        referee_blob = self.referee_output
        referee_hash = (
            bytes.fromhex(self.referee_receipt.output_hash[2:])
            if self.referee_receipt
            else (referee_blob.sha256() if referee_blob else bytes(32))
        )
        return {
            "accused": self.accused_node,
            "checker": self.checker_node,
            "jobId": bytes.fromhex(self.accused_receipt.job_id[2:]),
            "modelId": bytes.fromhex(self.accused_receipt.model_id[2:]),
            "start": self.accused_receipt.start,
            "end": self.accused_receipt.end,
            "tokens": self.accused_receipt.tokens,
            "inputHash": bytes.fromhex(self.input_hash[2:]),
            "accusedOutputHash": bytes.fromhex(self.accused_receipt.output_hash[2:]),
            "checkerOutputHash": bytes.fromhex(self.checker_receipt.output_hash[2:]),
            "referee": self.referee_node or ZERO_ADDRESS,
            "refereeOutputHash": referee_hash,
            "rowWidth": self.accused_output.row_width,
            "checkerRowWidth": self.checker_output.row_width,
            "refereeRowWidth": referee_blob.row_width if referee_blob else 0,
            "shardDtype": self.shard_dtype,
            "elementDtype": self.accused_output.element_dtype,
            "checkerElementDtype": self.checker_output.element_dtype,
            "refereeElementDtype": referee_blob.element_dtype if referee_blob else "",
        }

    def signed_by_runner(self, runner_key: bytes | str, oracle_domain: Domain) -> SpotCheckEvidence:
        named = self.model_copy(update={"runner": Account.from_key(runner_key).address})
        signature = sign_runner(runner_key, oracle_domain, "SpotCheck", named.runner_message())
        return named.model_copy(update={"runner_signature": signature})

    def signer(self, oracle_domain: Domain) -> str | None:
        """The address whose signature covers exactly this evidence (None when unsigned or
        unrecoverable); another address than :attr:`runner` when anything signed was changed."""
        return recover_runner(oracle_domain, "SpotCheck", self.runner_message(), self.runner_signature)


def sign_runner(runner_key: bytes | str, oracle_domain: Domain, primary: str, message: dict[str, Any]) -> str:
    """The runner's signature (0x hex) over ``message``, typed data ``primary`` in the oracle's domain."""
    return sign_typed(runner_key, oracle_domain, primary, message).hex()


def recover_runner(oracle_domain: Domain, primary: str, message: dict[str, Any], signature: str) -> str | None:
    """The address that signed ``message`` (None when unsigned or unrecoverable)."""
    if not signature:
        return None
    try:
        return recover_typed(oracle_domain, primary, message, bytes.fromhex(signature[2:]))
    except (ValueError, TypeError, BadSignature, KeyValidationError):  # unrecoverable signature bytes
        return None


class RunnerStatement(WireModel):
    """A spot-check runner's signed statement about one stage call of ``node`` (typed data
    :attr:`PRIMARY` in the oracle's domain). The oracle counts it only when a runner it trusts
    signed exactly these fields (``detail`` is not signed: for the log only)."""

    PRIMARY: ClassVar[str]

    node: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    job_id: str = Hex32
    start: int = Field(ge=0, lt=2**32)
    end: int = Field(ge=1, lt=2**32)
    detail: str = Field(default="", max_length=500)
    runner_signature: str = Field(default="", pattern=r"^(0x[0-9a-fA-F]{130})?$")

    def runner_message(self) -> dict[str, Any]:
        """The signed fields."""
        return {"node": self.node, "jobId": bytes.fromhex(self.job_id[2:]), "start": self.start, "end": self.end}

    def signed_by_runner(self, runner_key: bytes | str, oracle_domain: Domain) -> Self:
        signature = sign_runner(runner_key, oracle_domain, self.PRIMARY, self.runner_message())
        return self.model_copy(update={"runner_signature": signature})

    def runner(self, oracle_domain: Domain) -> str | None:
        """The address that signed it (None when unsigned or unrecoverable)."""
        return recover_runner(oracle_domain, self.PRIMARY, self.runner_message(), self.runner_signature)

    def key(self) -> tuple[str, str, int]:
        return self.node.lower(), self.job_id.lower(), self.start


class SpotCheckFailure(RunnerStatement):
    """A runner's signed statement that ``node`` did not hand over what a drawn check needed (its
    transcript of a session it served): no evidence to slash on, a failed verification for its
    reputation (``POST /v1/spot-checks/failures``)."""

    PRIMARY: ClassVar[str] = "SpotCheckFailure"

    reason: Literal["transcript_withheld"] = "transcript_withheld"

    def runner_message(self) -> dict[str, Any]:
        return {**super().runner_message(), "reason": self.reason}


class FingerprintCheckPass(RunnerStatement):
    """A runner's signed statement that ``checker``, a replica of ``node``'s range, accepted the
    call from the fingerprint ``node`` signed (sha256 ``fingerprint_hash``) with one prefill: a
    passed verification for ``node``'s reputation (``POST /v1/spot-checks/fingerprint-passes``).
    The oracle cannot re-check a prefill, so it takes the runner's word, as for a failure; the
    checker is named for the record and credited nothing (accepting is not evidence of its work)."""

    PRIMARY: ClassVar[str] = "FingerprintCheckPass"

    checker: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    fingerprint_hash: str = Hex32

    def runner_message(self) -> dict[str, Any]:
        return {
            **super().runner_message(),
            "checker": self.checker,
            "fingerprintHash": bytes.fromhex(self.fingerprint_hash[2:]),
        }


def build_evidence(
    accused: SignedReceipt,
    checker: SignedReceipt,
    accused_output: bytes,
    checker_output: bytes,
    element_dtype: ElementDtype,
    shard_dtype: ShardDtype,
    input_hash: bytes,
    domain: Domain,
    runner_key: bytes | str,
    oracle_domain: Domain,
    referee: SignedReceipt | None = None,
    referee_output: bytes | None = None,
    row_width: int = 0,
) -> SpotCheckEvidence:
    """Evidence from the signed receipts and raw outputs, signed by the runner that assigned the
    check (what the spot-check runner calls). ``domain`` is JobMarket's, ``oracle_domain``
    :func:`telemetry.oracle_domain`. Node addresses are recovered from the receipts. Pass a
    ``referee`` (a second checker's receipt and output) when the oracle requires one.
    """
    unsigned = SpotCheckEvidence(
        accused_node=receipt_signer(domain, accused.receipt, accused.signature.signature),
        checker_node=receipt_signer(domain, checker.receipt, checker.signature.signature),
        accused_receipt=ReceiptWire.from_signed(accused),
        checker_receipt=ReceiptWire.from_signed(checker),
        input_hash="0x" + input_hash.hex(),
        shard_dtype=shard_dtype,
        accused_output=StageOutputBlob.of(accused_output, element_dtype, row_width),
        checker_output=StageOutputBlob.of(checker_output, element_dtype, row_width),
        referee_node=receipt_signer(domain, referee.receipt, referee.signature.signature) if referee else None,
        referee_receipt=ReceiptWire.from_signed(referee) if referee else None,
        referee_output=StageOutputBlob.of(referee_output, element_dtype, row_width)
        if referee_output is not None
        else None,
    )
    return unsigned.signed_by_runner(runner_key, oracle_domain)
