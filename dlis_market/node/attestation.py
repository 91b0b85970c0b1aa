"""Attestation report: who this worker is, what code and shards it runs, on what hardware; signed.

The report binds the libp2p peer id, the node signing address, the sha256 of the installed
``dlis_market`` code, the sha256 of every shard file it loaded and its hardware profile at a
timestamp. Its hash (keccak256 of the canonical JSON) is what NodeRegistry stores; the node key
signs it as EIP-712 ``NodeAttestation`` in the NodeRegistry domain. :func:`verify_report`
checks every field and refuses with ``invalid attestation: <field>``.

This is a software attestation: it proves what the node key claims, not that the claim is true
on the machine. A hardware TEE quote (SGX/TDX/SEV-SNP) can be carried in ``tee_quote`` and
checked behind the same interface later; today it is always empty and never trusted.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from eth_utils import keccak
from pydantic import ValidationError

import dlis_market
from dlis_market.chain.typed_data import REGISTRY_DOMAIN, Domain, recover_typed, sign_typed
from dlis_market.node.errors import AttestationError
from dlis_market.node.profiler import HardwareProfile
from dlis_market.types import WireModel

REPORT_VERSION = 1


class AttestationReport(WireModel):
    version: int = REPORT_VERSION
    peer_id: str
    node_address: str
    code_hash: str
    model: str
    start: int
    end: int
    shards: dict[str, str]  # file path (relative to the shard folder) -> sha256
    hardware: HardwareProfile
    timestamp: int
    tee_quote: bytes = b""

    def report_hash(self) -> bytes:
        doc = self.model_dump(mode="json")
        return keccak(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


class SignedAttestation(WireModel):
    report: AttestationReport
    signature: bytes


def registry_domain(chain_id: int, registry_address: str) -> Domain:
    return Domain(REGISTRY_DOMAIN[0], REGISTRY_DOMAIN[1], chain_id, registry_address)


@lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 over the path and bytes of every .py file of the installed dlis_market, in order."""
    root = Path(dlis_market.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _message(report: AttestationReport) -> dict[str, Any]:
    """The EIP-712 ``NodeAttestation`` message of ``report``."""
    return {
        "reportHash": report.report_hash(),
        "node": report.node_address,
        "peerId": report.peer_id,
        "timestamp": report.timestamp,
    }


def sign_report(key: bytes, domain: Domain, report: AttestationReport) -> SignedAttestation:
    signature = sign_typed(key, domain, "NodeAttestation", _message(report))
    return SignedAttestation(report=report, signature=signature.signature)


def parse_signed(raw: Any) -> SignedAttestation:
    try:
        return SignedAttestation.model_validate(raw)
    except ValidationError as exc:
        loc = ".".join(str(p) for p in exc.errors()[0]["loc"]) or "report"
        raise AttestationError(f"invalid attestation: {loc} (malformed: {exc.errors()[0]['msg']})") from exc


def verify_report(
    signed: SignedAttestation,
    domain: Domain,
    *,
    peer_id: str | None = None,
    code: str | None = None,
    shards: Mapping[str, str] | None = None,
    max_age_s: float = 7 * 24 * 3600,
    now: float | None = None,
) -> bytes:
    """Check signature, peer id, code hash, shards, timestamp and hardware; returns the report hash."""
    report = signed.report
    try:
        signer = recover_typed(domain, "NodeAttestation", _message(report), signed.signature)
    except (ValueError, TypeError) as exc:
        raise AttestationError(f"invalid attestation: signature (does not parse: {exc})") from exc
    if signer.lower() != report.node_address.lower():
        raise AttestationError(
            f"invalid attestation: signature (signed by {signer}, report names node {report.node_address})"
        )
    if peer_id is not None and report.peer_id != peer_id:
        raise AttestationError(f"invalid attestation: peer_id (report says {report.peer_id}, peer is {peer_id})")
    if code is not None and report.code_hash != code:
        raise AttestationError(f"invalid attestation: code_hash ({report.code_hash} is not the expected {code})")
    if shards is not None and dict(report.shards) != dict(shards):
        raise AttestationError("invalid attestation: shards (sha256 of loaded shards differ from the manifest)")
    now = time.time() if now is None else now
    if not now - max_age_s <= report.timestamp <= now + 300:
        raise AttestationError(f"invalid attestation: timestamp ({report.timestamp} is stale or in the future)")
    hw = report.hardware
    if min(hw.gemm_flops, hw.memory_bandwidth, hw.layer_latency_s) <= 0 or hw.free_memory < 0:
        raise AttestationError("invalid attestation: hardware (non-positive measurements)")
    if report.tee_quote:
        raise AttestationError("invalid attestation: tee_quote (hardware quotes are not verified by this build)")
    return report.report_hash()
