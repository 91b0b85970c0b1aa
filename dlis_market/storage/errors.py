"""Errors of the shard store. Every one is a :class:`~dlis_market.errors.StorageError`."""

from __future__ import annotations

from dlis_market.errors import StorageError


class KuboUnreachableError(StorageError):
    """No Kubo RPC API answered at the configured URL."""


class KuboApiError(StorageError):
    """The Kubo RPC API answered with an error (Kubo's ``{"Message", "Code", "Type"}`` body)."""

    def __init__(self, message: str, *, status: int = 500, code: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ContentTimeoutError(StorageError):
    """Content was not delivered within its timeout: nobody reachable has it, or a peer stalled."""


class ShardIntegrityError(StorageError):
    """Content arrived but its size or sha256 differs from the manifest's."""


class ManifestError(StorageError):
    """A manifest or publication index is malformed or does not match what was expected."""


class NoDaemonError(StorageError):
    """A command that reports on the IPFS node in use found none running (and starts none)."""


class LocalNodeRequiredError(StorageError):
    """A fetch given no IPFS node of its own needs one: it has swarm providers, or no provider
    gateway answered (:func:`~dlis_market.storage.shard_store.fetch_shards` then starts one)."""


class DaemonError(StorageError):
    """The embedded IPFS daemon could not start, or its Kubo child process died."""


class LayerSelectionError(StorageError):
    """A requested layer range is outside the model, or its manifest names no layer ranges."""


class ProviderError(StorageError):
    """A provider given to fetch cannot be used as given (a Kubo RPC URL instead of its gateway URL, say)."""


class GatewayError(StorageError):
    """A provider's HTTP gateway is unreachable, answered an error, or cut its CAR short."""
