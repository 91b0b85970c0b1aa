"""Errors of the shared wire types: a signed message that does not verify or does not fit."""

from __future__ import annotations

from dlis_market.errors import DlisError


class SignedMessageError(DlisError):
    """A signed wire message is malformed, badly signed, expired or names something else."""


class SpanRecordError(SignedMessageError):
    """A DHT span announcement is unsigned, badly signed, stale or inconsistent: ignore it."""


class TicketError(SignedMessageError):
    """A session ticket is missing, forged, expired, not from a broker or names another session."""
