"""Errors of the shared wire types: a signed message that does not verify or does not fit, or that
the oracle refused."""

from __future__ import annotations

from dlis_market.errors import DlisError, OracleError


class SignedMessageError(DlisError):
    """A signed wire message is malformed, badly signed, expired or names something else."""


class SpanRecordError(SignedMessageError):
    """A DHT span announcement is unsigned, badly signed, stale or inconsistent: ignore it."""


class TicketError(SignedMessageError):
    """A session ticket is missing, forged, expired, not from a broker or names another session."""


class FingerprintError(DlisError):
    """A fingerprint cannot be made, read or compared."""


class FingerprintFormatError(FingerprintError):
    """Fingerprint bytes are truncated, too long, of another version or hold impossible values:
    refuse them (a worker that signed such bytes committed to nothing checkable)."""


class FingerprintShapeError(FingerprintError):
    """The fingerprint describes other hidden states (token count, hidden size) than the ones
    recomputed: it was made for another call or another model."""


class SpotCheckSecretError(DlisError):
    """The spot-check sampler secret on disk is not a whole secret."""


class TelemetryRefusedError(OracleError):
    """A telemetry report was refused; ``reason`` is one of
    :data:`~dlis_market.protocol.telemetry.REFUSAL_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProofFormatError(SignedMessageError):
    """Bytes that are not an EZKL proof JSON with BN254 instances (protocol/zk_claims.py)."""
