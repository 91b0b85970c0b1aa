"""Signed worker telemetry on the wire: the report, its EIP-712 signature, zstd encoding, the DHT key.

A worker signs each report with its node key as EIP-712 typed data::

    Telemetry(address node,uint64 seq,uint64 timestamp,bytes32 metricsHash)

in the domain ``("DLIS Oracle", "1", chainId, ReputationOracle address)``. ``metricsHash`` is
keccak256 of the canonical JSON of the metrics (sorted keys, no spaces), so the signature covers
every field. On the wire a report is ``zstd(json(SignedTelemetry))``; the blob authenticates
itself, so any peer (the DHT included) may relay it and the oracle checks it the same way.

On the DHT a worker stores its blob under key ``dlis/telemetry`` (:data:`TELEMETRY_KEY`), subkey =
its node address (checksummed); :func:`fetch_telemetry` reads them all back. The oracle's intake
(:class:`dlis_market.oracle.telemetry.TelemetryIntake`) refuses a report with one of
:data:`REFUSAL_REASONS`.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any, Protocol

import zstandard
from eth_utils import keccak
from pydantic import ConfigDict, Field, ValidationError
from web3 import Web3

from dlis_market.chain.typed_data import Domain, recover_typed, sign_typed, typed_digest
from dlis_market.protocol.errors import TelemetryRefusedError
from dlis_market.types import LayerRange, NodeId, WireModel

log = logging.getLogger(__name__)

ORACLE_DOMAIN = ("DLIS Oracle", "1")
REFUSAL_REASONS = ("oversized", "malformed", "forged", "unregistered", "duplicate", "superseded", "stale", "future")
MAX_LATENCIES = 256
MAX_JOBS = 64
UINT64_MAX = 2**64 - 1
TELEMETRY_KEY = "dlis/telemetry"


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
        return typed_digest(domain, "Telemetry", self.report.message())


def sign_telemetry(private_key: bytes | str, domain: Domain, report: TelemetryReport) -> SignedTelemetry:
    """Sign ``report`` with the node key (the worker side)."""
    signature = sign_typed(private_key, domain, "Telemetry", report.message())
    return SignedTelemetry(report=report, signature=signature.hex())


def telemetry_signer(domain: Domain, signed: SignedTelemetry) -> str:
    """The checksummed address that signed the report (another address when forged)."""
    return recover_typed(domain, "Telemetry", signed.report.message(), bytes.fromhex(signed.signature[2:]))


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


# ---------------------------------------------------------------------- on the DHT


class DhtReader(Protocol):
    """What :func:`fetch_telemetry` needs of a DHT (``hivemind.DHT`` has it)."""

    def get(self, key: str, latest: bool = False) -> Any: ...


def parse_telemetry(raw: Any) -> dict[str, bytes]:
    """Blobs by subkey (node address) from a DHT answer; drops entries that are not bytes.

    Nothing else is checked here: the oracle's intake checks the signature of every blob."""
    if raw is None or not isinstance(getattr(raw, "value", None), dict):
        return {}
    out: dict[str, bytes] = {}
    for subkey, item in raw.value.items():
        value = getattr(item, "value", None)
        if isinstance(subkey, str) and isinstance(value, bytes):
            out[subkey] = value
        else:
            log.info("ignoring a malformed telemetry entry under %r", subkey)
    return out


def fetch_telemetry(dht: DhtReader) -> dict[str, bytes]:
    """Every telemetry blob on the DHT under :data:`TELEMETRY_KEY`, by node address."""
    return parse_telemetry(dht.get(TELEMETRY_KEY, latest=True))
