"""Spot-check verification: which stage calls to re-execute, how to compare outputs, and evidence.

Pure functions and wire types; :mod:`dlis_market.oracle.slashing` puts accepted evidence on chain.

**Sampling.** :class:`SpotCheckSampler` selects a stage call ``(job id, start)`` when
``keccak256(secret ++ job_id ++ start) < fraction * 2**256``: a fixed fraction, reproducible by
the runner (the broker) from its secret, unpredictable to workers.

**Outputs.** A stage's receipt commits ``outputHash = sha256(concatenated raw output rows)``
(see ``node/receipts.py``). Evidence carries both raw outputs; the oracle checks each against its
signed receipt, decodes them (float32 / bfloat16 / float16 / int64, little endian), splits them
into tokens (``row_width`` values each: the hidden size) and compares the worst token's relative
L2 error ``max_t ||a_t - b_t|| / max(||a_t||, ||b_t||)`` with the tolerance of the shard dtype.
Per token, because models such as SmolLM2 carry a few huge activations in some tokens only: an
error relative to the largest value anywhere (this module's first measure) hid an nf4 model
served as bf16 on real weights (4.7e-2, under any bf16 tolerance that leaves room for rounding).

**Tolerances** (:data:`TOLERANCES`). Two honest workers running the *same* shard on the same
input differ by floating-point re-association (threads, batch composition, kernels) and, across
hardware, by different kernels altogether. Measured (2026-11-27), worst token's relative L2:

* CPU, random Llama (hidden 256, 2 layers, prefill 8 + 6 decode steps, 4 prompts), one thread
  alone vs two threads batched among 4 (``tests/unit/oracle/tolerance_measure.py``);
* CPU vs an NVIDIA H100 (torch 2.11, bitsandbytes 0.50.2), SmolLM2-135M's real layers [10, 18)
  (and [10, 16): how errors grow with depth), 6 prompts, alone and batched, fp32 with and
  without TF32 (``bench/gpu_tolerance.py``).

=====  ===========  ============================  =========================================  =========
dtype  honest, CPU  honest, CPU vs H100, 8 (6)    cheats (CPU random / H100 real, 8 layers)  tolerance
=====  ===========  ============================  =========================================  =========
fp32   4.6e-7       6.2e-7; TF32 3.6e-4 (3.5e-4)  bf16 6.7e-3 / 1.2e-2, int8 1.6e-2          2e-3
bf16   0            9.2e-3 (6.6e-3)               int8 1.8e-2 / 6.6e-2, nf4 0.19 / 0.17      4e-2
int8   0            6.9e-2 (6.8e-2)               nf4 0.19 / 0.19                            0.12
nf4    0            1.3e-2 (1.2e-2)               wrong input 0.59                           0.1
ids    --           --                            --                                         0 (exact)
=====  ===========  ============================  =========================================  =========

Honest bf16 across hardware grows with depth (6.6e-3 over 6 layers, 9.2e-3 over 8), so its
tolerance keeps 4x room over the 8-layer figure, at the price of catching int8 served as bf16
only on real weights (6.6e-2; 1.8e-2 on the random model). int8 across CPU and GPU, whose
bitsandbytes kernels differ, has the least margin on both sides (0.069 honest, 0.19 for nf4
passed off as int8, tolerance 0.12): where checkers run other hardware than the accused, require
a referee. Every dtype catches nf4 served in its place and wrong inputs (0.58-0.59, measured on
CPU for every dtype). ``ids`` (sampled token ids at the last stage) may differ in one token per 16 (a near-tie of
the two top tokens flipped by other hardware; the replay is teacher-forced, so a flip stays one
token); shorter calls must match exactly.

A faulty or lazy worker (random output, skipped layers, wrong weights or inputs) differs by
0.2-1.4 on this scale (a ``--byzantine`` worker's noise of half the RMS: about 0.5).

**Evidence.** Both signed receipts (same job, model, range and token count, signed by two
different registered nodes), the input hash the spot-check runner fed both, both outputs, and
the *runner's* EIP-712 signature (oracle domain) over ``SpotCheck(accused, checker, jobId, start,
end, inputHash, accusedOutputHash, checkerOutputHash)``. Receipts settle on chain, so they are
public: without the runner's signature any registered node could sign a "re-execution" of its
own with a different output and frame an honest node for the reporter reward. Only runners the
oracle is configured to trust (``spot_check_runners``, plus the oracle's own account) may assign
a checker; evidence without such a signature is refused (``unauthorized_runner``). Two outputs
alone cannot say which node is wrong (the accused is the node the runner spot-checked): evidence
may carry a *referee*, a second checker's receipt and output, and then counts only if the
referee matches the checker and not the accused (2 of 3); ``spot_check_require_referee`` makes
that mandatory, which protects honest nodes from a single faulty checker.
``evidence_hash`` identifies the *fault* (accused node, job, range), so the contract's
one-use-per-evidence rule also means one slash per faulty stage call, whoever reports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from eth_abi import encode
from eth_account import Account
from eth_keys.exceptions import BadSignature
from eth_keys.exceptions import ValidationError as KeyValidationError
from eth_utils import keccak
from pydantic import Field

from dlis_market.chain.job_market import Receipt, SignedReceipt, receipt_signer
from dlis_market.chain.typed_data import CompactSignature, Domain, recover_typed, sign_typed
from dlis_market.oracle.errors import EvidenceRefusedError, SpotCheckSecretError
from dlis_market.types import ZERO_ADDRESS, WireModel

ShardDtype = Literal["fp32", "bf16", "int8", "nf4", "ids"]
ElementDtype = Literal["float32", "bfloat16", "float16", "int64"]
EVIDENCE_TAG = keccak(text="DLIS SpotCheck v1")
Hex32 = Field(pattern=r"^0x[0-9a-fA-F]{64}$")
SECRET_BYTES = 32


@dataclass(frozen=True)
class Tolerance:
    max_rel_diff: float


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(2e-3),
    "bf16": Tolerance(4e-2),
    "int8": Tolerance(0.12),
    "nf4": Tolerance(0.1),
    "ids": Tolerance(0.0),  # per call: one flipped token per IDS_TOKENS_PER_FLIP tokens
}
# Greedy sampling on other hardware can flip a near-tie between the two top tokens; the replay is
# teacher-forced, so a flip stays one token. A call may differ in one token per 16; a stage that
# changes more (a --byzantine one changes every token) is caught; calls under 16 tokens must match.
IDS_TOKENS_PER_FLIP = 16


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


# ------------------------------------------------------------------------------ outputs


def decode_output(data: bytes, element_dtype: str) -> np.ndarray:
    """Raw little-endian output bytes as a float64 (or int64) vector."""
    if element_dtype == "float32":
        return np.frombuffer(data, dtype="<f4").astype(np.float64)
    if element_dtype == "float16":
        return np.frombuffer(data, dtype="<f2").astype(np.float64)
    if element_dtype == "bfloat16":
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    if element_dtype == "int64":
        return np.frombuffer(data, dtype="<i8")
    raise ValueError(f"unknown element dtype {element_dtype!r}")


@dataclass(frozen=True)
class Comparison:
    max_abs_diff: float
    scale: float  # the L2 norm of the worst token's output
    rel_diff: float  # worst token's ||a - b|| / scale; inf when shapes or dtypes differ or values are not finite
    tolerance: float

    @property
    def within(self) -> bool:
        return self.rel_diff <= self.tolerance


def compare_outputs(a: np.ndarray, b: np.ndarray, shard_dtype: str, row_width: int = 0) -> Comparison:
    """Compare two outputs of the same stage call under the tolerance of ``shard_dtype``.

    The outputs are rows of ``row_width`` values (one token's hidden state; 0, or a width that
    does not divide the size: one row) and the difference is the worst token's relative L2 error
    ``max_t ||a_t - b_t|| / max(||a_t||, ||b_t||)``.
    """
    tol = TOLERANCES.get(shard_dtype)
    if tol is None:
        raise ValueError(f"no tolerance for shard dtype {shard_dtype!r}; known: {', '.join(TOLERANCES)}")
    if a.shape != b.shape:
        return Comparison(float("inf"), 0.0, float("inf"), tol.max_rel_diff)
    if a.size == 0:
        return Comparison(0.0, 0.0, 0.0, tol.max_rel_diff)
    if shard_dtype == "ids":  # share of sampled tokens that differ; see IDS_FLIPS_PER_TOKEN
        mismatched = int(np.count_nonzero(a != b))
        return Comparison(
            float(mismatched), float(a.size), mismatched / a.size, (a.size // IDS_TOKENS_PER_FLIP) / a.size
        )
    af, bf = a.astype(np.float64), b.astype(np.float64)
    if not (np.all(np.isfinite(af)) and np.all(np.isfinite(bf))):
        same = bool(np.array_equal(af, bf, equal_nan=True))
        return Comparison(0.0 if same else float("inf"), 0.0, 0.0 if same else float("inf"), tol.max_rel_diff)
    width = row_width if row_width > 0 and af.size % row_width == 0 else af.size
    ar, br = af.reshape(-1, width), bf.reshape(-1, width)
    norms = np.maximum(np.maximum(np.linalg.norm(ar, axis=1), np.linalg.norm(br, axis=1)), 1e-6)
    per_row = np.linalg.norm(ar - br, axis=1) / norms
    worst = int(np.argmax(per_row))
    diff = float(np.max(np.abs(af - bf)))
    return Comparison(diff, float(norms[worst]), float(per_row[worst]), tol.max_rel_diff)


# ------------------------------------------------------------------------------ evidence


class ReceiptWire(WireModel):
    """A signed JobMarket ``Receipt`` as JSON (hex for bytes, decimal string for the amount)."""

    job_id: str = Hex32
    model_id: str = Hex32
    start: int = Field(ge=0, lt=2**32)
    end: int = Field(ge=1, lt=2**32)
    tokens: int = Field(ge=0, lt=2**32)
    output_hash: str = Hex32
    amount: str = Field(pattern=r"^[0-9]{1,78}$")
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")

    @classmethod
    def from_signed(cls, signed: SignedReceipt) -> ReceiptWire:
        r = signed.receipt
        return cls(
            job_id="0x" + r.job_id.hex(),
            model_id="0x" + r.model_id.hex(),
            start=r.start,
            end=r.end,
            tokens=r.tokens,
            output_hash="0x" + r.output_hash.hex(),
            amount=str(r.amount),
            signature=signed.signature.hex(),
        )

    def receipt(self) -> Receipt:
        return Receipt(
            job_id=bytes.fromhex(self.job_id[2:]),
            model_id=bytes.fromhex(self.model_id[2:]),
            start=self.start,
            end=self.end,
            tokens=self.tokens,
            output_hash=bytes.fromhex(self.output_hash[2:]),
            amount=int(self.amount),
        )

    def signed(self) -> SignedReceipt:
        return SignedReceipt(self.receipt(), CompactSignature.from_bytes(bytes.fromhex(self.signature[2:])))


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


def check_runner(signer: str | None, claimed: str, runners: Collection[str], what: str) -> str:
    """The trusted runner that signed ``what``; refused as ``tampered`` when the signature covers
    other contents than those posted (it recovers to someone else than the runner named), as
    ``unauthorized_runner`` when the signer is not one this oracle trusts."""
    allowed = {r.lower() for r in runners}
    if signer is not None and signer.lower() != claimed.lower():
        raise EvidenceRefusedError(
            "tampered",
            f"the runner signature over this {what} recovers to {signer}, not to the runner {claimed} it names: "
            "something it signed was changed after signing; post it exactly as the runner signed it",
        )
    if signer is None or signer.lower() not in allowed:
        raise EvidenceRefusedError(
            "unauthorized_runner",
            f"{what} is signed by runner {signer or '(no valid signature)'}, which is not one of the "
            f"{len(allowed)} spot-check runners this oracle trusts (oracle spot_check_runners setting)",
        )
    return signer


class SpotCheckFailure(WireModel):
    """A runner's signed statement that ``node`` did not hand over what a drawn check needed (its
    transcript of a session it served): no evidence to slash on, a failed verification for its
    reputation (``POST /v1/spot-checks/failures``)."""

    node: str = Field(pattern=r"^0x[0-9a-fA-F]{40}$")
    job_id: str = Hex32
    start: int = Field(ge=0, lt=2**32)
    end: int = Field(ge=1, lt=2**32)
    reason: Literal["transcript_withheld"] = "transcript_withheld"
    detail: str = Field(default="", max_length=500)  # not signed: for the log only
    runner_signature: str = Field(default="", pattern=r"^(0x[0-9a-fA-F]{130})?$")

    def runner_message(self) -> dict[str, Any]:
        """The signed fields (``detail`` is not signed)."""
        return {
            "node": self.node,
            "jobId": bytes.fromhex(self.job_id[2:]),
            "start": self.start,
            "end": self.end,
            "reason": self.reason,
        }

    def signed_by_runner(self, runner_key: bytes | str, oracle_domain: Domain) -> SpotCheckFailure:
        signature = sign_runner(runner_key, oracle_domain, "SpotCheckFailure", self.runner_message())
        return self.model_copy(update={"runner_signature": signature})

    def runner(self, oracle_domain: Domain) -> str | None:
        """The address that signed it (None when unsigned or unrecoverable)."""
        return recover_runner(oracle_domain, "SpotCheckFailure", self.runner_message(), self.runner_signature)

    def key(self) -> tuple[str, str, int]:
        return self.node.lower(), self.job_id.lower(), self.start


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


@dataclass(frozen=True)
class NodeInfo:
    """What verification needs from NodeRegistry about a receipt signer."""

    operator: str
    active: bool


@dataclass(frozen=True)
class Verdict:
    """Evidence that proved a fault: who is slashed, who reported, by how much they differ."""

    evidence_hash: bytes
    accused_node: str
    accused_operator: str
    checker_node: str
    reporter: str  # the checker's operator receives the reporter share
    comparison: Comparison
    referee_node: str | None = None


def evidence_hash(chain_id: int, accused_node: str, receipt: Receipt) -> bytes:
    """keccak256(abi.encode(tag, chainId, accused, jobId, modelId, start, end)): one per fault."""
    return bytes(
        keccak(
            encode(
                ["bytes32", "uint256", "address", "bytes32", "bytes32", "uint32", "uint32"],
                [EVIDENCE_TAG, chain_id, accused_node, receipt.job_id, receipt.model_id, receipt.start, receipt.end],
            )
        )
    )


def _signer(domain: Domain, wire: ReceiptWire, role: str) -> str:
    try:
        signed = wire.signed()
        return receipt_signer(domain, signed.receipt, signed.signature.signature)
    except (ValueError, TypeError, BadSignature, KeyValidationError) as exc:  # unrecoverable signature bytes
        raise EvidenceRefusedError("bad_signature", f"the {role} receipt's signature does not recover: {exc}") from exc


def _party(
    domain: Domain,
    lookup: Callable[[str], NodeInfo | None],
    role: str,
    claimed: str,
    wire: ReceiptWire,
    blob: StageOutputBlob,
) -> tuple[str, NodeInfo]:
    """The registered node that signed ``wire`` over exactly ``blob``; refusal otherwise."""
    signer = _signer(domain, wire, role)
    if signer.lower() != claimed.lower():
        raise EvidenceRefusedError("bad_signature", f"{role} receipt is signed by {signer}, not by {claimed}")
    info = lookup(signer)
    if info is None:
        raise EvidenceRefusedError("unregistered", f"{role} node {signer} is not registered in NodeRegistry")
    receipt = wire.receipt()
    if blob.sha256() != receipt.output_hash:
        raise EvidenceRefusedError(
            "output_not_signed",
            f"sha256 of the {role} output is 0x{blob.sha256().hex()} but its receipt signs "
            f"0x{receipt.output_hash.hex()}; send the exact bytes the node output",
        )
    return signer, info


def _compare(a: StageOutputBlob, b: StageOutputBlob, shard_dtype: str, what: str) -> Comparison:
    if a.element_dtype != b.element_dtype or a.row_width != b.row_width:
        # the runner decodes and cuts every output of one call alike: a difference here is in the
        # labels, not in what the nodes computed, so it proves nothing about them
        raise EvidenceRefusedError(
            "inconsistent_outputs",
            f"{what} are labelled differently ({a.element_dtype} in rows of {a.row_width} vs {b.element_dtype} in "
            f"rows of {b.row_width}); label every output of the call with the same dtype and row width",
        )
    return compare_outputs(
        decode_output(a.data, a.element_dtype), decode_output(b.data, b.element_dtype), shard_dtype, a.row_width
    )


def _same_call(a: Receipt, b: Receipt, what: str) -> None:
    if (a.job_id, a.model_id, a.start, a.end, a.tokens) != (b.job_id, b.model_id, b.start, b.end, b.tokens):
        raise EvidenceRefusedError(
            "different_call",
            f"receipts are for different calls: accused job 0x{a.job_id.hex()} [{a.start}, {a.end}) {a.tokens} "
            f"tokens vs {what} job 0x{b.job_id.hex()} [{b.start}, {b.end}) {b.tokens} tokens; re-execute the "
            "same job, range and tokens",
        )


def check_evidence(
    evidence: SpotCheckEvidence,
    domain: Domain,
    lookup: Callable[[str], NodeInfo | None],
    oracle_domain: Domain,
    runners: Collection[str],
    require_referee: bool = False,
) -> Verdict:
    """Accept evidence only if it proves a mismatch beyond tolerance; else raise a clear refusal.

    ``domain`` is JobMarket's EIP-712 domain (receipts are JobMarket receipts); ``lookup(node)``
    returns the registry entry of a node or ``None``; ``runners`` are the addresses allowed to
    assign spot checks (signing in ``oracle_domain``). With a referee (required when
    ``require_referee``), the referee must agree with the checker and disagree with the accused.
    Pure apart from ``lookup``.
    """
    check_runner(evidence.signer(oracle_domain), evidence.runner, runners, "evidence")
    accused, accused_info = _party(
        domain, lookup, "accused", evidence.accused_node, evidence.accused_receipt, evidence.accused_output
    )
    checker, checker_info = _party(
        domain, lookup, "checker", evidence.checker_node, evidence.checker_receipt, evidence.checker_output
    )
    if accused == checker:
        raise EvidenceRefusedError("same_node", f"both receipts are signed by {accused}; need two nodes")
    if accused_info.operator.lower() == checker_info.operator.lower():
        raise EvidenceRefusedError(
            "same_operator", f"accused and checker are both operated by {checker_info.operator}; need two operators"
        )
    a = evidence.accused_receipt.receipt()
    _same_call(a, evidence.checker_receipt.receipt(), "checker")
    cmp = _compare(
        evidence.accused_output, evidence.checker_output, evidence.shard_dtype, "accused and checker outputs"
    )
    if cmp.within:
        raise EvidenceRefusedError(
            "within_tolerance",
            f"outputs differ by {cmp.rel_diff:.3g} (relative; max abs {cmp.max_abs_diff:.3g}), within the "
            f"{evidence.shard_dtype} tolerance {cmp.tolerance:.3g}: no fault, nothing slashed",
        )
    referee = None
    parts = (evidence.referee_node, evidence.referee_receipt, evidence.referee_output)
    if any(p is not None for p in parts):
        if evidence.referee_node is None or evidence.referee_receipt is None or evidence.referee_output is None:
            raise EvidenceRefusedError("incomplete_referee", "a referee needs its node, receipt and output")
        referee, referee_info = _party(
            domain, lookup, "referee", evidence.referee_node, evidence.referee_receipt, evidence.referee_output
        )
        if referee in (accused, checker):
            raise EvidenceRefusedError("same_node", f"referee {referee} is also the accused or the checker")
        if referee_info.operator.lower() in (accused_info.operator.lower(), checker_info.operator.lower()):
            raise EvidenceRefusedError(
                "same_operator",
                f"referee {referee} is operated by {referee_info.operator}, who also operates the accused or the "
                "checker: one operator cannot confirm its own accusation",
            )
        _same_call(a, evidence.referee_receipt.receipt(), "referee")
        with_checker = _compare(
            evidence.referee_output, evidence.checker_output, evidence.shard_dtype, "referee and checker outputs"
        )
        with_accused = _compare(
            evidence.referee_output, evidence.accused_output, evidence.shard_dtype, "referee and accused outputs"
        )
        if not with_checker.within or with_accused.within:
            raise EvidenceRefusedError(
                "checkers_disagree",
                f"the referee differs from the checker by {with_checker.rel_diff:.3g} and from the accused by "
                f"{with_accused.rel_diff:.3g} (tolerance {cmp.tolerance:.3g}); it must match the checker and "
                "not the accused: nothing is proven, re-check with another node",
            )
    elif require_referee:
        raise EvidenceRefusedError(
            "referee_required", "this oracle slashes only when a second checker (referee) confirms the mismatch"
        )
    return Verdict(
        evidence_hash=evidence_hash(domain.chain_id, accused, a),
        accused_node=accused,
        accused_operator=accused_info.operator,
        checker_node=checker,
        reporter=checker_info.operator,
        comparison=cmp,
        referee_node=referee,
    )
