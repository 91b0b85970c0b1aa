"""The exception root of dlis_market.

Every package raises a subclass of :class:`DlisError` whose message says what was wrong, with
the numbers, and what to do about it. Packages define their own subclasses next to their code
(``chain/errors.py``, ``inference/errors.py``...) and derive them from the classes here.
"""

from __future__ import annotations


class DlisError(Exception):
    """Root of every error dlis_market raises on purpose."""


class ConfigError(DlisError):
    """A setting is missing, malformed or unsafe."""


class ChainError(DlisError):
    """Talking to the chain failed or a contract call reverted."""


class StorageError(DlisError):
    """Fetching, pinning or verifying content on IPFS failed."""


class InferenceError(DlisError):
    """Loading or running a model stage failed."""


class NodeError(DlisError):
    """A worker node could not start, serve or be reached."""


class BrokerError(DlisError):
    """The broker refused or failed a request."""


class OracleError(DlisError):
    """The oracle refused or failed to process telemetry or evidence."""
