"""Spot-check verification in the oracle: does posted evidence prove a fault, and whose.

The formats (receipts on the wire, output blobs, the runner's signed evidence and failure
statements) and the sampler live in :mod:`dlis_market.protocol.spot_checks`; the comparison and
its tolerances in :mod:`dlis_market.protocol.outputs`. :mod:`dlis_market.oracle.slashing` puts
accepted evidence on chain.

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

from collections.abc import Callable, Collection
from dataclasses import dataclass

from eth_abi import encode
from eth_keys.exceptions import BadSignature
from eth_keys.exceptions import ValidationError as KeyValidationError
from eth_utils import keccak

from dlis_market.chain.job_market import Receipt, receipt_signer
from dlis_market.chain.typed_data import Domain
from dlis_market.oracle.errors import EvidenceRefusedError
from dlis_market.protocol.outputs import Comparison, compare_outputs, decode_output
from dlis_market.protocol.receipts import ReceiptWire
from dlis_market.protocol.spot_checks import SpotCheckEvidence, StageOutputBlob

EVIDENCE_TAG = keccak(text="DLIS SpotCheck v1")


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
