"""Errors of the simulator: a scenario that does not load or a what-if that does not apply."""

from __future__ import annotations

from dlis_market.errors import DlisError


class SimError(DlisError):
    """Root of the simulator's errors."""


class ScenarioError(SimError):
    """A scenario file or a ``--change`` is malformed; the message says which field and why."""
