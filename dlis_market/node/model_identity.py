"""Which on-chain model id this worker's receipts name.

Model ids are namespaced by publisher (``NodeRegistry.modelIdOf(publisher, keccak256(name))``), so
the same shards can be published by several accounts under several ids. A worker serves one of
them: ``chain.model_publisher`` when set; otherwise the one publisher whose latest version on chain
is exactly this manifest (by sha256). If several publishers published this manifest (a copy), the
worker refuses to guess and asks for ``chain.model_publisher``. A worker with no registry address (a
dev swarm without a chain) names the zero publisher's id: its receipts cannot settle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from web3 import Web3
from web3.exceptions import ContractLogicError

from dlis_market.chain.client import connect_web3
from dlis_market.chain.deploy import load_artifact
from dlis_market.errors import ConfigError
from dlis_market.settings import Settings
from dlis_market.types import ZERO_ADDRESS, model_id


@dataclass(frozen=True)
class ServedModelId:
    model_id: bytes
    publisher: str
    how: str  # "configured", "chain" or "no chain"


@dataclass(frozen=True)
class RegisteredModel:
    """The latest version NodeRegistry records for a model id."""

    manifest_sha256: str  # hex
    manifest_cid: str
    num_layers: int


def _registry(settings: Settings) -> Any:
    w3 = connect_web3(settings.chain.rpc_url, 10.0)
    abi = load_artifact("NodeRegistry")["abi"]
    return w3.eth.contract(address=Web3.to_checksum_address(settings.node.registry_address), abi=abi)


def registered_model(settings: Settings, mid: bytes) -> RegisteredModel | None:
    """What the chain records for model id ``mid`` (None when nobody published it)."""
    try:
        _publisher, layers, _version, _updated, sha, cid = _registry(settings).functions.getModel(mid).call()
    except ContractLogicError:  # NodeRegistryUnknownModel
        return None
    return RegisteredModel(bytes(sha).hex(), str(cid), int(layers))


def publishers_of(settings: Settings, name: str, manifest_sha256: str) -> list[str]:
    """Accounts whose latest on-chain version of ``name`` is exactly this manifest."""
    registry = _registry(settings)
    found: list[str] = []
    for mid in registry.functions.modelIds().call():
        publisher, _layers, _version, _updated, sha, _cid = registry.functions.getModel(mid).call()
        if bytes(sha).hex() == manifest_sha256 and bytes(mid).hex() == model_id(name, publisher)[2:]:
            found.append(Web3.to_checksum_address(publisher))
    return found


def resolve_model_id(settings: Settings, name: str, manifest_sha256: str) -> ServedModelId:
    """The model id to sign receipts for (see the module notes); raises :class:`ConfigError`
    when the chain has this manifest under several publishers and none is configured."""
    configured = settings.chain.model_publisher
    if configured:
        publisher = Web3.to_checksum_address(configured)
        return ServedModelId(bytes.fromhex(model_id(name, publisher)[2:]), publisher, "configured")
    if int(settings.node.registry_address, 16) == 0:
        return ServedModelId(bytes.fromhex(model_id(name, ZERO_ADDRESS)[2:]), ZERO_ADDRESS, "no chain")
    found = publishers_of(settings, name, manifest_sha256)
    if len(found) == 1:
        return ServedModelId(bytes.fromhex(model_id(name, found[0])[2:]), found[0], "chain")
    if not found:
        raise ConfigError(
            f"no account published model {name!r} with this manifest (sha256 {manifest_sha256}) in NodeRegistry "
            f"{settings.node.registry_address}; publish it (`dlis model publish`) or set chain.model_publisher "
            "(DLIS_CHAIN__MODEL_PUBLISHER) to the publisher whose jobs this worker serves"
        )
    raise ConfigError(
        f"{len(found)} accounts published model {name!r} with this manifest ({', '.join(found)}); set "
        "chain.model_publisher (DLIS_CHAIN__MODEL_PUBLISHER) to the one whose jobs this worker serves"
    )
