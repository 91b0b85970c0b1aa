"""The chain side of `dlis model publish|fetch`: register a published manifest in NodeRegistry and
look up what the chain registered for a CID, so fetch verifies against it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dlis_market.chain.errors import DeploymentNotFoundError
from dlis_market.errors import ChainError
from dlis_market.settings import Settings
from dlis_market.types import Cid

if TYPE_CHECKING:  # the storage stack loads when a model command runs, not with every `dlis` command
    from dlis_market.storage.fetch import ExpectedManifest
    from dlis_market.storage.publish import ModelRegistration


def register_published(settings: Settings, reg: ModelRegistration) -> None:
    """Publish (or version) the model in NodeRegistry from ``chain.publisher_account``."""
    from dlis_market.chain.client import ChainClient
    from dlis_market.chain.node_registry import NodeRegistry
    from dlis_market.cli.context import CliState, unlock

    if reg.model_name is None or reg.num_layers is None:
        raise ChainError("the manifest lacks model_name or num_layers, so it cannot be registered on chain")
    registry = NodeRegistry(ChainClient(settings))
    publisher = unlock(CliState(settings), settings.chain.publisher_account, None)
    registry.publish_model(
        publisher,
        reg.model_name,
        str(reg.manifest_cid),
        bytes.fromhex(reg.manifest_sha256),
        reg.num_layers,
    )


def expected_from_chain(settings: Settings, cid: Cid) -> ExpectedManifest | None:
    """The sha256 the chain registered for this manifest CID, or None when no model has it."""
    from dlis_market.chain.client import ChainClient
    from dlis_market.chain.node_registry import NodeRegistry
    from dlis_market.storage.fetch import ExpectedManifest

    try:
        registry = NodeRegistry(ChainClient(settings))
    except (DeploymentNotFoundError, ChainError):
        return None  # no chain configured: fetch still verifies every file against the manifest
    for mid in registry.model_ids():
        rec = registry.get_model(mid)
        if rec is not None and rec.manifest_cid == str(cid):
            return ExpectedManifest(sha256=rec.manifest_sha256.hex(), cid=cid)
    return None
