"""Attacker: someone who controls a model record on chain (its first publisher, or a squatter who
published a name first: model ids are keccak256(name), first come) and uses it against the jobs
of that model.

* Changing the layer count in a new version would make every served job of the model
  unsettleable (its receipts cover the old [0, numLayers)); the registry refuses it.
* A squatted or re-pointed record (another manifest, another layer count) must not be served: the
  broker's catalog refuses to load a model whose local manifest differs from the chain's.

Real Anvil with the real contracts, real SmolLM2 shards for the catalog.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from eth_account.signers.local import LocalAccount

from dlis_market.broker.catalog import ManifestMismatchError, ModelCatalog
from dlis_market.chain.devnet import LocalMarket
from dlis_market.chain.errors import ContractRevertError
from dlis_market.chain.job_market import (
    JobAuthorization,
    Receipt,
    SignedJob,
    SignedReceipt,
    sign_authorization,
    sign_receipt,
)
from dlis_market.inference.manifest import load_manifest, sha256_file
from dlis_market.types import model_id

UNIT = 10**18


def _served_job(market: LocalMarket, model: bytes, layers: int) -> SignedJob:
    """One node served all ``layers`` of ``model`` for a funded client and signed its receipt."""
    node = market.enroll_node(market.new_funded_account(1_000 * UNIT))
    client = market.new_funded_account(100 * UNIT)
    jm = market.market()
    jm.deposit(client, 10 * UNIT)
    dom = jm.domain()
    auth = JobAuthorization(client.address, market.broker.address, model, 2 * UNIT, 1, market.client.timestamp() + 600)
    rc = Receipt(auth.job_id, model, 0, layers, 8, secrets.token_bytes(32), UNIT)
    return SignedJob(
        auth, sign_authorization(client.key, dom, auth), (SignedReceipt(rc, sign_receipt(node.key, dom, rc)),)
    )


def test_publisher_cannot_change_the_layer_count_under_served_jobs(market: LocalMarket) -> None:
    registry = market.registry()
    name = f"model-{secrets.token_hex(4)}"
    model = registry.publish_model(market.deployer, name, "QmV1", b"\x01" * 32, 30)
    job = _served_job(market, model, 30)
    # the attack: a new version that claims 12 layers
    with pytest.raises(ContractRevertError) as err:
        registry.publish_model(market.deployer, name, "QmV2", b"\x02" * 32, 12)
    assert err.value.error == "NodeRegistryLayerCountFixed"
    assert err.value.error_args == {"modelId": model, "numLayers": 30, "given": 12}
    assert registry.get_model(model).num_layers == 30  # type: ignore[union-attr]
    # a new manifest with the same layer count is still a valid new version
    registry.publish_model(market.deployer, name, "QmV2", b"\x02" * 32, 30)
    market.market().settle_batch(market.broker, secrets.token_bytes(32), [job])
    assert market.market().nonce_used(job.authorization.client, 1)


def _publish_local(
    market: LocalMarket,
    shards: Path,
    sha: bytes | None = None,
    layers: int | None = None,
    publisher: LocalAccount | None = None,
) -> None:
    manifest = load_manifest(shards)
    market.registry().publish_model(
        publisher or market.deployer,
        manifest.model_name,
        "QmLocal",
        sha if sha is not None else bytes.fromhex(sha256_file(shards / "manifest.json")),
        layers if layers is not None else manifest.num_layers,
    )


def test_catalog_serves_a_model_that_matches_the_chain(market: LocalMarket, smollm2_shards: Path) -> None:
    _publish_local(market, smollm2_shards)
    catalog = ModelCatalog.from_shard_dirs([smollm2_shards], market.deployer.address, registry=market.registry())
    assert list(catalog.models) == [load_manifest(smollm2_shards).model_name]


def test_a_squatter_cannot_take_a_publishers_model_id(market: LocalMarket, smollm2_shards: Path) -> None:
    """The attack on first-come ids (keccak256 of the name): a squatter publishes the name first,
    with another manifest, and then owns the id, so the real publisher cannot publish it and
    every broker that serves the name serves the squatter's record. Ids are namespaced by
    publisher now: the squatter's record lives under its own id, the owner publishes as if the
    squatter did not exist, and the broker (serving the owner's namespace) serves the owner's."""
    squatter = market.new_funded_account(0)
    name = load_manifest(smollm2_shards).model_name
    _publish_local(market, smollm2_shards, sha=b"\x66" * 32, publisher=squatter)
    _publish_local(market, smollm2_shards)  # the owner, after the squatter
    registry = market.registry()
    owners = bytes.fromhex(model_id(name, market.deployer.address)[2:])
    squatters = bytes.fromhex(model_id(name, squatter.address)[2:])
    assert owners != squatters
    assert registry.get_model(owners).publisher == market.deployer.address  # type: ignore[union-attr]
    assert registry.get_model(owners).version == 1  # type: ignore[union-attr]
    assert registry.get_model(squatters).manifest_sha256 == b"\x66" * 32  # type: ignore[union-attr]
    catalog = ModelCatalog.from_shard_dirs([smollm2_shards], market.deployer.address, registry=registry)
    assert catalog.get(name).model_id == "0x" + owners.hex()
    # A later "version" by the squatter changes only its own record.
    _publish_local(market, smollm2_shards, sha=b"\x67" * 32, publisher=squatter)
    assert registry.get_model(owners).version == 1  # type: ignore[union-attr]


def test_catalog_refuses_a_model_whose_chain_record_differs(market: LocalMarket, smollm2_shards: Path) -> None:
    """A broker set to serve a namespace whose record is another manifest does not serve it."""
    squatter = market.new_funded_account(0)
    local_sha = sha256_file(smollm2_shards / "manifest.json")
    _publish_local(market, smollm2_shards, sha=b"\x66" * 32, publisher=squatter)
    with pytest.raises(ManifestMismatchError) as err:
        ModelCatalog.from_shard_dirs([smollm2_shards], squatter.address, registry=market.registry())
    assert local_sha in str(err.value) and "66" * 32 in str(err.value) and squatter.address in str(err.value)


def test_catalog_refuses_a_layer_count_that_differs(market: LocalMarket, smollm2_shards: Path) -> None:
    layers = load_manifest(smollm2_shards).num_layers
    _publish_local(market, smollm2_shards, layers=layers + 1)
    with pytest.raises(ManifestMismatchError, match=f"{layers + 1} layers"):
        ModelCatalog.from_shard_dirs([smollm2_shards], market.deployer.address, registry=market.registry())


def test_catalog_refuses_a_model_the_chain_does_not_know(market: LocalMarket, smollm2_shards: Path) -> None:
    with pytest.raises(ManifestMismatchError, match="not published"):
        ModelCatalog.from_shard_dirs([smollm2_shards], market.deployer.address, registry=market.registry())


def test_catalog_without_a_chain_loads_as_before(smollm2_shards: Path) -> None:
    assert list(ModelCatalog.from_shard_dirs([smollm2_shards], "0x" + "00" * 20).models)
