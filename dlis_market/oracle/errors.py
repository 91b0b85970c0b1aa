"""Errors of the oracle (all derive from :class:`~dlis_market.errors.OracleError`); the telemetry
refusal it answers with is :class:`~dlis_market.protocol.errors.TelemetryRefusedError`."""

from __future__ import annotations

from dlis_market.errors import OracleError


class PrivacyBudgetExhaustedError(OracleError):
    """Releasing a figure would spend more privacy budget than a node has left."""


class EvidenceRefusedError(OracleError):
    """Spot-check evidence does not prove a fault; nothing is slashed. ``reason`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProofNotFoundError(OracleError):
    """No stored telemetry leaf for that node and epoch."""


class OracleRoleMissingError(OracleError):
    """The oracle account lacks ORACLE_ROLE or SLASHER_ROLE."""


class StoreError(OracleError):
    """The oracle's database refused an operation (a value that does not fit, a bad state)."""
