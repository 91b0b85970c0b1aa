"""NodeRegistry: node binding, registration lifecycle, models; every revert and event."""

import pytest
from brownie import NodeRegistry, chain
from conftest import (
    MANIFEST_SHA,
    MIN_STAKE,
    MODEL_ID,
    MODEL_NAME_HASH,
    NODES,
    ZERO,
    capability,
    future,
    model_id_of,
    past,
    register,
    registration,
    registry_domain,
    reverts,
    sign_binding,
    stake,
)
from eth_utils import keccak

from dlis_market.chain.typed_data import sign_typed

NODE, NODE_B = NODES[0], NODES[1]


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    pass


@pytest.fixture(scope="module")
def staked(deployed, roles):
    stake(deployed.token, deployed.staking, roles["op1"], MIN_STAKE)
    stake(deployed.token, deployed.staking, roles["op2"], MIN_STAKE)
    return deployed


def test_constructor(registry, staking, roles):
    assert registry.staking() == staking
    assert registry.nodeCount() == 0
    assert len(registry.modelIds()) == 0
    with reverts("NodeRegistryZeroAddress"):
        NodeRegistry.deploy(ZERO, {"from": roles["deployer"]})


def test_register_node(staked, registry, roles):
    op = roles["op1"]
    tx = register(registry, op, NODE, "peer-A", endpoint="/ip4/10.0.0.1/tcp/9")
    assert dict(tx.events["NodeRegistered"][0]) == {
        "node": NODE.address,
        "operator": op,
        "peerId": "peer-A",
        "endpoint": "/ip4/10.0.0.1/tcp/9",
        "attestationHash": "0x" + keccak(text="peer-A").hex(),
    }
    n = registry.getNode(NODE.address)
    assert n["operator"] == op and n["active"]
    assert n["registeredAt"] == n["updatedAt"] == tx.timestamp
    assert n["peerId"] == "peer-A" and n["endpoint"] == "/ip4/10.0.0.1/tcp/9"
    assert tuple(n["capability"]) == capability()
    assert registry.isRoutable(NODE.address)
    assert tuple(registry.settlementInfo(NODE.address)) == (op, True)
    assert registry.nodesOf(op) == [NODE.address]
    assert registry.nodeCount() == 1 and registry.nodeAt(0) == NODE.address


def test_register_reverts_on_fields(staked, registry, roles):
    op, dl = roles["op1"], future(600)
    sig = sign_binding(registry, NODE, op, "p", dl).signature
    with reverts("NodeRegistryZeroAddress"):
        registry.registerNode((ZERO, "p", "e", capability(), b"\x00" * 32), dl, sig, {"from": op})
    with reverts("NodeRegistryEmptyField", "peerId"):
        registry.registerNode((NODE.address, "", "e", capability(), b"\x00" * 32), dl, sig, {"from": op})
    with reverts("NodeRegistryEmptyField", "endpoint"):
        registry.registerNode((NODE.address, "p", "", capability(), b"\x00" * 32), dl, sig, {"from": op})


def test_register_requires_stake(staked, registry, roles):
    with reverts("NodeRegistryOperatorNotStaked", roles["stranger"]):
        register(registry, roles["stranger"], NODE, "peer-A")


def test_register_binding_expired(staked, registry, roles):
    dl = past()
    with reverts("NodeRegistryBindingExpired", dl):
        register(registry, roles["op1"], NODE, "peer-A", deadline=dl)


def test_register_invalid_binding(staked, registry, roles):
    op, dl = roles["op1"], future(600)
    # the right message signed by another key
    msg = {"operator": str(op), "node": NODE.address, "peerId": "peer-A", "deadline": dl}
    sig = sign_typed(NODE_B.key, registry_domain(registry), "NodeBinding", msg).signature
    with reverts("NodeRegistryInvalidBinding", NODE_B.address, NODE.address):
        registry.registerNode(registration(NODE, "peer-A"), dl, sig, {"from": op})
    # a binding naming op1 cannot be used by op2
    sig = sign_binding(registry, NODE, op, "peer-A", dl).signature
    with reverts("NodeRegistryInvalidBinding"):
        registry.registerNode(registration(NODE, "peer-A"), dl, sig, {"from": roles["op2"]})
    # nor for another peer id or deadline
    with reverts("NodeRegistryInvalidBinding"):
        registry.registerNode(registration(NODE, "peer-B"), dl, sig, {"from": op})
    with reverts("NodeRegistryInvalidBinding"):
        registry.registerNode(registration(NODE, "peer-A"), dl + 1, sig, {"from": op})
    # malformed signatures recover nothing
    with reverts("NodeRegistryInvalidBinding", ZERO, NODE.address):
        registry.registerNode(registration(NODE, "peer-A"), dl, b"\x01" * 10, {"from": op})
    with reverts("NodeRegistryInvalidBinding", ZERO, NODE.address):
        registry.registerNode(registration(NODE, "peer-A"), dl, sig[:64], {"from": op})


def test_register_already_registered_and_peer_id_claims_are_not_exclusive(staked, registry, roles):
    register(registry, roles["op1"], NODE, "peer-A")
    with reverts("NodeRegistryAlreadyRegistered", NODE.address, roles["op1"]):
        register(registry, roles["op2"], NODE, "peer-X")
    # Another node claiming the same peer id does not block it, nor is it blocked: the claim is
    # used off chain only with the libp2p key's proof, so exclusivity would only let a squatter
    # block the real holder.
    register(registry, roles["op2"], NODE_B, "peer-A")
    assert registry.getNode(NODE.address)["peerId"] == registry.getNode(NODE_B.address)["peerId"] == "peer-A"


def test_update_node(staked, registry, roles):
    op = roles["op1"]
    register(registry, op, NODE, "peer-A")
    chain.sleep(10)
    att = keccak(text="new attestation")
    tx = registry.updateNode(NODE.address, "/dns/x/tcp/1", (1, 2, 3, 4), att, {"from": op})
    assert dict(tx.events["NodeUpdated"][0]) == {
        "node": NODE.address,
        "endpoint": "/dns/x/tcp/1",
        "attestationHash": "0x" + att.hex(),
    }
    n = registry.getNode(NODE.address)
    assert n["endpoint"] == "/dns/x/tcp/1" and tuple(n["capability"]) == (1, 2, 3, 4)
    assert n["updatedAt"] == tx.timestamp > n["registeredAt"]
    with reverts("NodeRegistryEmptyField", "endpoint"):
        registry.updateNode(NODE.address, "", (1, 2, 3, 4), att, {"from": op})
    with reverts("NodeRegistryNotOperator", NODE.address, roles["op2"]):
        registry.updateNode(NODE.address, "/e", (1, 2, 3, 4), att, {"from": roles["op2"]})
    with reverts("NodeRegistryUnknownNode", NODE_B.address):
        registry.updateNode(NODE_B.address, "/e", (1, 2, 3, 4), att, {"from": op})


def test_deregister_and_reregister(staked, registry, roles):
    op1, op2 = roles["op1"], roles["op2"]
    register(registry, op1, NODE, "peer-A")
    with reverts("NodeRegistryNotOperator", NODE.address, op2):
        registry.deregisterNode(NODE.address, {"from": op2})
    tx = registry.deregisterNode(NODE.address, {"from": op1})
    assert dict(tx.events["NodeDeregistered"][0]) == {"node": NODE.address, "operator": op1}
    assert not registry.isRoutable(NODE.address)
    assert tuple(registry.settlementInfo(NODE.address)) == (op1, False)
    assert registry.getNode(NODE.address)["active"] is False  # record stays readable
    with reverts("NodeRegistryUnknownNode", NODE.address):
        registry.deregisterNode(NODE.address, {"from": op1})
    # the peer id is free again, and the node key may move to another operator with a new binding
    register(registry, op2, NODE_B, "peer-A")
    tx = register(registry, op2, NODE, "peer-A2")
    assert tx.events["NodeRegistered"][0]["operator"] == op2
    assert registry.nodesOf(op1) == []
    assert set(registry.nodesOf(op2)) == {NODE.address, NODE_B.address}
    assert registry.nodeCount() == 2


def test_routable_follows_stake_live(staked, registry, staking, roles):
    op = roles["op1"]
    register(registry, op, NODE, "peer-A")
    assert registry.isRoutable(NODE.address)
    staking.slash(op, 1, keccak(text="ev"), roles["reporter"], {"from": roles["oracle"]})
    assert not registry.isRoutable(NODE.address)
    assert tuple(registry.settlementInfo(NODE.address)) == (op, False)
    stake(staked.token, staking, op, 1)
    assert registry.isRoutable(NODE.address)
    staking.requestUnstake(1, {"from": op})
    assert not registry.isRoutable(NODE.address)


def test_get_node_unknown(registry):
    with reverts("NodeRegistryUnknownNode", NODE.address):
        registry.getNode(NODE.address)
    assert tuple(registry.settlementInfo(NODE.address)) == (ZERO, False)
    assert not registry.isRoutable(NODE.address)


def test_publish_model(registry, roles):
    pub = roles["deployer"]
    assert registry.modelIdOf(pub, MODEL_NAME_HASH) == "0x" + MODEL_ID.hex()
    tx = registry.publishModel(MODEL_NAME_HASH, "bafy1", MANIFEST_SHA, 30, {"from": pub})
    assert tx.return_value == "0x" + MODEL_ID.hex()
    assert dict(tx.events["ModelPublished"][0]) == {
        "modelId": "0x" + MODEL_ID.hex(),
        "publisher": pub,
        "nameHash": "0x" + MODEL_NAME_HASH.hex(),
        "version": 1,
        "manifestCid": "bafy1",
        "manifestSha256": "0x" + MANIFEST_SHA.hex(),
        "numLayers": 30,
    }
    m = registry.getModel(MODEL_ID)
    assert (m["publisher"], m["numLayers"], m["version"], m["manifestCid"]) == (pub, 30, 1, "bafy1")
    assert registry.modelLayers(MODEL_ID) == 30
    tx = registry.publishModel(MODEL_NAME_HASH, "bafy2", keccak(text="v2"), 30, {"from": pub})
    assert tx.events["ModelPublished"][0]["version"] == 2
    assert registry.getModel(MODEL_ID)["manifestCid"] == "bafy2"
    # the layer count is fixed by the first version: another count would void every served job
    with reverts("NodeRegistryLayerCountFixed", MODEL_ID, 30, 32):
        registry.publishModel(MODEL_NAME_HASH, "bafy3", MANIFEST_SHA, 32, {"from": pub})
    assert registry.modelLayers(MODEL_ID) == 30
    assert registry.modelIds() == ["0x" + MODEL_ID.hex()]


def test_a_name_published_by_a_squatter_first_does_not_touch_the_owners_model(registry, roles):
    """Ids are namespaced by publisher: the squatter's record lives under its own id; the owner
    publishes (and versions) its model as if the squatter did not exist."""
    squatter, owner = roles["stranger"], roles["deployer"]
    tx = registry.publishModel(MODEL_NAME_HASH, "bafy-squat", keccak(text="squat"), 12, {"from": squatter})
    squatted = model_id_of(squatter.address, MODEL_NAME_HASH)
    assert tx.return_value == "0x" + squatted.hex() and squatted != MODEL_ID
    registry.publishModel(MODEL_NAME_HASH, "bafy1", MANIFEST_SHA, 30, {"from": owner})
    registry.publishModel(MODEL_NAME_HASH, "bafy-squat2", keccak(text="squat2"), 12, {"from": squatter})
    mine = registry.getModel(MODEL_ID)
    assert (mine["publisher"], mine["version"], mine["numLayers"], mine["manifestCid"]) == (owner, 1, 30, "bafy1")
    theirs = registry.getModel(squatted)
    assert (theirs["publisher"], theirs["version"], theirs["numLayers"]) == (squatter, 2, 12)
    assert registry.modelIds() == ["0x" + squatted.hex(), "0x" + MODEL_ID.hex()]


def test_publish_model_reverts(registry, roles):
    p = {"from": roles["deployer"]}
    with reverts("NodeRegistryInvalidModel", "nameHash is zero"):
        registry.publishModel(b"\x00" * 32, "c", MANIFEST_SHA, 1, p)
    with reverts("NodeRegistryEmptyField", "manifestCid"):
        registry.publishModel(MODEL_NAME_HASH, "", MANIFEST_SHA, 1, p)
    with reverts("NodeRegistryInvalidModel", "manifestSha256 is zero"):
        registry.publishModel(MODEL_NAME_HASH, "c", b"\x00" * 32, 1, p)
    with reverts("NodeRegistryInvalidModel", "numLayers is zero"):
        registry.publishModel(MODEL_NAME_HASH, "c", MANIFEST_SHA, 0, p)
    with reverts("NodeRegistryUnknownModel", MODEL_ID):
        registry.getModel(MODEL_ID)
    assert registry.modelLayers(MODEL_ID) == 0


def test_binding_replay_after_deregistration(staked, registry, roles):
    """A NodeBinding has no nonce: the operator can re-register with the same binding until its
    deadline (documented behaviour, the binding names the operator)."""
    op, dl = roles["op1"], future(600)
    sig = sign_binding(registry, NODE, op, "peer-A", dl).signature
    registry.registerNode(registration(NODE, "peer-A"), dl, sig, {"from": op})
    registry.deregisterNode(NODE.address, {"from": op})
    registry.registerNode(registration(NODE, "peer-A"), dl, sig, {"from": op})
    assert registry.isRoutable(NODE.address)


def test_old_peer_id_is_released_on_reregistration(staked, registry, roles):
    op = roles["op1"]
    register(registry, op, NODE, "peer-old")
    registry.deregisterNode(NODE.address, {"from": op})
    register(registry, op, NODE, "peer-new")
    assert registry.getNode(NODE.address)["peerId"] == "peer-new"
    register(registry, roles["op2"], NODE_B, "peer-old")
