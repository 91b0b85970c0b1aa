"""Signed worker telemetry: the wire type, its EIP-712 signature, zstd encoding and the intake.

A worker signs each report with its node key as EIP-712 typed data::

    Telemetry(address node,uint64 seq,uint64 timestamp,bytes32 metricsHash)

in the domain ``("DLIS Oracle", "1", chainId, ReputationOracle address)``. ``metricsHash`` is
keccak256 of the canonical JSON of the metrics (sorted keys, no spaces), so the signature covers
every field. On the wire a report is ``zstd(json(SignedTelemetry))``; the blob authenticates
itself, so any peer (the DHT included) may relay it and the oracle checks it the same way.

:class:`TelemetryIntake` refuses, in this order, and counts each refusal by reason:
``oversized`` / ``malformed`` (decoding), ``forged`` (the signature does not recover to the
report's node), ``unregistered`` (the node is not in NodeRegistry), ``duplicate`` (this node's
report with this seq was accepted already: a copy that came another way, or the same report sent
again; harmless either way), ``superseded`` (a report the oracle never took, older than one it did:
it arrived late, e.g. from a worker's outbox after its newer report was relayed), ``stale`` (older
than ``max_age_s``) and ``future`` (more than ``max_skew_s`` ahead of the oracle's clock).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from typing import Any

import zstandard
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_keys.exceptions import BadSignature
from eth_keys.exceptions import ValidationError as KeyValidationError
from eth_utils import keccak
from pydantic import ConfigDict, Field, ValidationError
from web3 import Web3

from dlis_market.chain.typed_data import Domain
from dlis_market.oracle.errors import TelemetryRefusedError
from dlis_market.types import LayerRange, NodeId, WireModel

ORACLE_DOMAIN = ("DLIS Oracle", "1")
TELEMETRY_TYPE = [
    ("node", "address"),
    ("seq", "uint64"),
    ("timestamp", "uint64"),
    ("metricsHash", "bytes32"),
]
REFUSAL_REASONS = ("oversized", "malformed", "forged", "unregistered", "duplicate", "superseded", "stale", "future")
MAX_LATENCIES = 256
MAX_JOBS = 64
UINT64_MAX = 2**64 - 1


def oracle_domain(chain_id: int, reputation_oracle: str) -> Domain:
    """The EIP-712 domain of telemetry: verifying contract is the ReputationOracle."""
    return Domain(ORACLE_DOMAIN[0], ORACLE_DOMAIN[1], chain_id, Web3.to_checksum_address(reputation_oracle))


class JobOutcome(WireModel):
    """How one job's stage call ended on this node."""

    model_config = ConfigDict(allow_inf_nan=False)

    job_id: str = Field(pattern=r"^0x[0-9a-fA-F]{64}$")
    ok: bool
    latency_ms: float = Field(ge=0)
    tokens: int = Field(ge=0)


class TelemetryMetrics(WireModel):
    """What a worker measured over the interval since its previous report.

    ``advertised_tps`` is what it announces on the DHT; ``measured_tps`` what it actually
    processed (tokens per second of busy time). Latencies are per decode step, milliseconds.
    Infinite and NaN values are refused (they would poison sums and the canonical JSON).
    """

    model_config = ConfigDict(allow_inf_nan=False)

    uptime_s: float = Field(ge=0)  # since the worker started
    served: LayerRange | None = None
    advertised_tps: float = Field(ge=0)
    measured_tps: float = Field(ge=0)
    free_kv_slots: int = Field(ge=0)
    gflops: float | None = Field(default=None, ge=0)  # profiler's GEMM figure
    memory_mib: int | None = Field(default=None, ge=0)
    latencies_ms: tuple[float, ...] = Field(default=(), max_length=MAX_LATENCIES)
    sessions_ok: int = Field(default=0, ge=0)
    sessions_failed: int = Field(default=0, ge=0)
    jobs: tuple[JobOutcome, ...] = Field(default=(), max_length=MAX_JOBS)

    def digest(self) -> bytes:
        """keccak256 of the canonical JSON (sorted keys, compact): the signed ``metricsHash``."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return keccak(text=canonical)


class TelemetryReport(WireModel):
    node: NodeId
    seq: int = Field(ge=0, le=UINT64_MAX)
    timestamp: int = Field(ge=0, le=UINT64_MAX)  # unix seconds, worker clock
    metrics: TelemetryMetrics

    def message(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "seq": self.seq,
            "timestamp": self.timestamp,
            "metricsHash": self.metrics.digest(),
        }


class SignedTelemetry(WireModel):
    report: TelemetryReport
    signature: str = Field(pattern=r"^0x[0-9a-fA-F]{130}$")

    def digest(self, domain: Domain) -> bytes:
        """The EIP-712 digest the node signed: what the Merkle leaf of an epoch commits to."""
        signable = encode_typed_data(full_message=_full_message(domain, self.report))
        return bytes(keccak(b"\x19" + signable.version + signable.header + signable.body))


class ReceivedTelemetry(WireModel):
    """An accepted report and when the oracle received it, by its own clock: uptime counts arrival
    slots, not the time a report claims (a report signed later and backdated fills no slot)."""

    received_at: float = Field(ge=0)
    telemetry: SignedTelemetry


def _full_message(domain: Domain, report: TelemetryReport) -> dict[str, Any]:
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "Telemetry": [{"name": n, "type": t} for n, t in TELEMETRY_TYPE],
        },
        "primaryType": "Telemetry",
        "domain": domain.as_dict(),
        "message": report.message(),
    }


def sign_telemetry(private_key: bytes | str, domain: Domain, report: TelemetryReport) -> SignedTelemetry:
    """Sign ``report`` with the node key (the worker side)."""
    signed = Account.sign_message(encode_typed_data(full_message=_full_message(domain, report)), private_key)
    return SignedTelemetry(report=report, signature="0x" + bytes(signed.signature).hex())


def telemetry_signer(domain: Domain, signed: SignedTelemetry) -> str:
    """The checksummed address that signed the report (another address when forged)."""
    signable = encode_typed_data(full_message=_full_message(domain, signed.report))
    return str(Account.recover_message(signable, signature=bytes.fromhex(signed.signature[2:])))


def encode_telemetry(signed: SignedTelemetry, level: int = 3) -> bytes:
    """``zstd(json)``: the body of ``POST /v1/telemetry``."""
    return zstandard.ZstdCompressor(level=level).compress(signed.model_dump_json().encode())


def decode_telemetry(blob: bytes, max_bytes: int, max_decompressed_bytes: int) -> SignedTelemetry:
    """Decompress (bounded: a zstd bomb stops at the limit) and validate a telemetry blob."""
    if len(blob) > max_bytes:
        raise TelemetryRefusedError(
            "oversized", f"telemetry body is {len(blob)} bytes, limit {max_bytes}; send one report per request"
        )
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)) as reader:
            raw = reader.read(max_decompressed_bytes + 1)
    except zstandard.ZstdError as exc:
        raise TelemetryRefusedError("malformed", f"telemetry body is not zstd: {exc}") from exc
    if len(raw) > max_decompressed_bytes:
        raise TelemetryRefusedError(
            "oversized", f"telemetry decompresses to more than {max_decompressed_bytes} bytes; trim the metrics"
        )
    try:
        return SignedTelemetry.model_validate_json(raw)
    except ValidationError as exc:
        raise TelemetryRefusedError(
            "malformed",
            f"telemetry does not match SignedTelemetry: {exc.error_count()} errors, first: "
            f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}",
        ) from exc


class TelemetryIntake:
    """Checks telemetry blobs and keeps the accepted ones; counts every outcome by reason.

    ``is_registered(node)`` is consulted after the signature check (pass a NodeRegistry lookup;
    ``None`` accepts any correctly signed node, for tests and offline replay). ``last_seq`` may be
    seeded from stored state so that a restarted oracle still refuses replays.
    """

    def __init__(
        self,
        domain: Domain,
        *,
        max_age_s: float,
        max_skew_s: float,
        max_bytes: int,
        max_decompressed_bytes: int,
        is_registered: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
        last_seq: dict[str, int] | None = None,
        known: Callable[[str, int], bool] | None = None,
    ) -> None:
        self.domain = domain
        self.max_age_s = max_age_s
        self.max_skew_s = max_skew_s
        self.max_bytes = max_bytes
        self.max_decompressed_bytes = max_decompressed_bytes
        self.is_registered = is_registered
        self.clock = clock
        self.last_seq: dict[str, int] = dict(last_seq or {})
        # whether a (node, seq) was accepted before this process started (the service's store);
        # what this process accepted it remembers itself
        self.known = known
        self._taken: set[tuple[str, int]] = set()
        self.counts: dict[str, int] = {reason: 0 for reason in ("accepted", *REFUSAL_REASONS)}
        self.accepted: list[SignedTelemetry] = []

    def submit(self, blob: bytes) -> SignedTelemetry:
        """Decode and check ``blob``; keep and return it, or raise :class:`TelemetryRefusedError`."""
        signed = self.check(blob)
        self.accept(signed)
        return signed

    def check(self, blob: bytes) -> SignedTelemetry:
        r"""Decode and check ``blob`` without keeping it (refusals are counted): a caller that stores
        accepted reports durably stores it first, then passes it to :meth:`accept`."""
        try:
            signed = decode_telemetry(blob, self.max_bytes, self.max_decompressed_bytes)
            self._check(signed)
        except TelemetryRefusedError as exc:
            self.counts[exc.reason] += 1
            raise
        return signed

    def accept(self, signed: SignedTelemetry) -> None:
        """Keep a checked report: its seq becomes the node's last (later replays are refused)."""
        self.last_seq[signed.report.node] = signed.report.seq
        self._taken.add((signed.report.node, signed.report.seq))
        self.counts["accepted"] += 1
        self.accepted.append(signed)

    def _check(self, signed: SignedTelemetry) -> None:
        report = signed.report
        if not Web3.is_checksum_address(report.node):
            raise TelemetryRefusedError("malformed", f"node {report.node!r} is not a checksummed address")
        try:
            signer = telemetry_signer(self.domain, signed)
        except (ValueError, TypeError, BadSignature, KeyValidationError) as exc:  # unrecoverable signature
            raise TelemetryRefusedError("forged", f"signature of {report.node} does not recover: {exc}") from exc
        if signer != report.node:
            raise TelemetryRefusedError(
                "forged",
                f"report claims node {report.node} but is signed by {signer}; sign with the node key "
                f"in domain {self.domain.name} v{self.domain.version} chain {self.domain.chain_id}",
            )
        if self.is_registered is not None and not self.is_registered(report.node):
            raise TelemetryRefusedError(
                "unregistered", f"node {report.node} is not registered in NodeRegistry; `dlis node register` first"
            )
        last = self.last_seq.get(report.node)
        if last is not None and report.seq <= last:
            key = (report.node, report.seq)
            if key in self._taken or (self.known is not None and self.known(*key)):
                raise TelemetryRefusedError("duplicate", f"seq {report.seq} of {report.node} was accepted already")
            raise TelemetryRefusedError(
                "superseded",
                f"seq {report.seq} of {report.node} is below its newest accepted seq {last}; reports of a node "
                "must arrive in order (this one came too late and is not counted)",
            )
        now = self.clock()
        age = now - report.timestamp
        if age > self.max_age_s:
            raise TelemetryRefusedError(
                "stale", f"report of {report.node} is {age:.0f} s old, limit {self.max_age_s:.0f} s; check its clock"
            )
        if -age > self.max_skew_s:
            raise TelemetryRefusedError(
                "future",
                f"report of {report.node} is {-age:.0f} s ahead of the oracle clock, limit {self.max_skew_s:.0f} s",
            )

    def drain(self) -> list[SignedTelemetry]:
        """The reports accepted since the last drain (the epoch loop takes them)."""
        out, self.accepted = self.accepted, []
        return out
