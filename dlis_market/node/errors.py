"""Errors of the worker node and of the client-side pipeline driver (all derive from NodeError)."""

from __future__ import annotations

from dlis_market.errors import NodeError


class ProtocolError(NodeError):
    """A peer sent a frame that is malformed, oversized or of an unknown version/op."""


class RemoteError(NodeError):
    """A peer answered a request with an error; ``code`` says which kind."""

    def __init__(self, message: str, code: str = "error", peer: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.peer = peer


class PeerUnreachableError(NodeError):
    """A peer could not be reached or its stream closed."""

    def __init__(self, message: str, peer: str) -> None:
        super().__init__(message)
        self.peer = peer


class StageFailedError(NodeError):
    """A stage on a session's route failed; ``peer`` names it (None when it cannot be told)."""

    def __init__(self, message: str, peer: str | None) -> None:
        super().__init__(message)
        self.peer = peer


class NoRouteError(NodeError):
    """No chain of live, unbanned peers covers the layers a job needs."""

    def __init__(self, message: str, missing: list[tuple[int, int]] | None = None) -> None:
        super().__init__(message)
        self.missing = missing or []


class CapacityError(NodeError):
    """A stage refused a session for want of room (slots, per-opener limit, length): not a fault."""


class BudgetError(NodeError):
    """The cheapest route costs more than the job's max cost."""


class AttestationError(NodeError):
    """An attestation report does not verify; the message names the field."""


class ReceiptError(NodeError):
    """A stage receipt is missing, malformed or not signed by the stage's node key."""


class IdentityError(NodeError):
    """The node identity (libp2p key + signing key) cannot be created or unlocked."""


class ZkUnsupportedError(NodeError):
    """A session asks for a proof this stage cannot make (not the last stage, or a head too large
    or of another architecture or dtype): the job's fault, not the stage's."""
