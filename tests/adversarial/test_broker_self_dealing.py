"""Attacker: a broker that also runs a node and pays itself.

A broker holds its clients' authorizations. If it could settle one with receipts signed by a node
it operates, it could charge the client up to the authorized maximum for work nobody checked.
JobMarket now refuses receipts whose node, or the node's operator, is the settling broker
(``JobMarketSelfDealing``): a broker cannot be paid for a job it settles. What remains (a broker
colluding with a node under another, separately staked operator) is stated in the README's threat
model.

Real Anvil with the real contracts, through the Python bindings.
"""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account

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
from dlis_market.chain.node_registry import Capability, DeviceClass
from dlis_market.types import model_id
from tests.integration.conftest import DEV_PUBLISHER

UNIT = 10**18
LAYERS = 30
MODEL = bytes.fromhex(model_id("smollm2-135m", DEV_PUBLISHER)[2:])


def _self_dealt_job(market: LocalMarket, node_key) -> tuple[SignedJob, str]:
    """A client authorizes 10 DLIS at the broker; one receipt over all layers, signed by
    ``node_key``, claims (almost) all of it."""
    jm = market.market()
    client = market.new_funded_account(100 * UNIT)
    jm.deposit(client, 50 * UNIT)
    dom = jm.domain()
    auth = JobAuthorization(
        client.address, market.broker.address, MODEL, 10 * UNIT, secrets.randbits(64), market.client.timestamp() + 600
    )
    rc = Receipt(auth.job_id, MODEL, 0, LAYERS, 4096, secrets.token_bytes(32), 9 * UNIT)
    job = SignedJob(
        auth, sign_authorization(client.key, dom, auth), (SignedReceipt(rc, sign_receipt(node_key, dom, rc)),)
    )
    return job, client.address


@pytest.fixture()
def published(market: LocalMarket) -> LocalMarket:
    market.registry().publish_model(market.deployer, "smollm2-135m", "QmManifest", b"\x11" * 32, LAYERS)
    return market


def test_broker_cannot_settle_receipts_of_a_node_it_operates(published: LocalMarket) -> None:
    market = published
    jm = market.market()
    market.fund(market.broker.address, 2_000 * UNIT)
    node = market.enroll_node(market.broker)  # the broker stakes and registers a node of its own
    job, client = _self_dealt_job(market, node.key)
    escrow = jm.escrow_of(client)
    with pytest.raises(ContractRevertError) as err:
        jm.settle_batch(market.broker, secrets.token_bytes(32), [job])
    assert err.value.error == "JobMarketSelfDealing"
    assert err.value.error_args["node"].lower() == node.address.lower()
    assert jm.escrow_of(client) == escrow and jm.claimable_of(market.broker.address) == 0
    assert not jm.nonce_used(client, job.authorization.nonce)


def test_broker_key_registered_as_a_node_cannot_sign_receipts_it_settles(published: LocalMarket) -> None:
    """The broker's own key registered as a node under a puppet operator."""
    market = published
    jm = market.market()
    puppet = market.new_funded_account(2_000 * UNIT)
    market.staking().stake(puppet, market.staking().min_stake())
    registry = market.registry()
    deadline = market.client.timestamp() + 3600
    pid = f"12D3KooW{secrets.token_hex(20)}"
    broker_as_node = Account.from_key(market.broker.key)
    binding = registry.sign_binding(broker_as_node, puppet.address, pid, deadline)
    registry.register(
        puppet, market.broker.address, pid, "/ip4/127.0.0.1/tcp/4001", Capability(8192, 100, 1000, DeviceClass.LAPTOP),
        b"\x00" * 32, binding, deadline,
    )  # fmt: skip
    job, client = _self_dealt_job(market, market.broker.key)
    with pytest.raises(ContractRevertError) as err:
        jm.settle_batch(market.broker, secrets.token_bytes(32), [job])
    assert err.value.error == "JobMarketSelfDealing"
    assert jm.claimable_of(puppet.address) == 0
