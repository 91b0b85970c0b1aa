"""ReputationOracle: epochs, scores, telemetry Merkle proofs."""

import pytest
from brownie import ReputationOracle
from conftest import NODES, reverts
from eth_utils import keccak

A, B = NODES[0].address, NODES[1].address
ROOT = keccak(text="root")


@pytest.fixture(autouse=True)
def isolation(fn_isolation):
    pass


def _hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)


def test_constructor_roles(oracle, roles):
    assert oracle.hasRole(oracle.DEFAULT_ADMIN_ROLE(), roles["deployer"])
    assert oracle.hasRole(oracle.ORACLE_ROLE(), roles["oracle"])
    assert oracle.latestEpoch() == 0
    assert len(oracle.epochs()) == 0
    fresh = ReputationOracle.deploy(roles["stranger"], {"from": roles["deployer"]})
    assert fresh.hasRole(fresh.DEFAULT_ADMIN_ROLE(), roles["stranger"])


def test_post_epoch(oracle, roles):
    tx = oracle.postEpoch(1, [A, B], [9_000, 10_000], ROOT, {"from": roles["oracle"]})
    ups = tx.events["ReputationUpdated"]
    assert [dict(e) for e in ups] == [
        {"node": A, "epoch": 1, "scoreBps": 9_000},
        {"node": B, "epoch": 1, "scoreBps": 10_000},
    ]
    assert dict(tx.events["EpochPosted"][0]) == {"epoch": 1, "telemetryRoot": "0x" + ROOT.hex(), "nodeCount": 2}
    assert tuple(oracle.latestReputation(A)) == (9_000, 1)
    assert oracle.reputationAt(B, 1) == 10_000
    info = oracle.epochInfo(1)
    assert (info[0], info[1], info[2]) == ("0x" + ROOT.hex(), tx.timestamp, 2)
    oracle.postEpoch(5, [A], [100], ROOT, {"from": roles["oracle"]})
    assert oracle.latestEpoch() == 5
    assert [int(e) for e in oracle.epochs()] == [1, 5]
    assert tuple(oracle.latestReputation(A)) == (100, 5)
    assert tuple(oracle.latestReputation(B)) == (10_000, 1)
    assert oracle.reputationAt(A, 1) == 9_000
    assert oracle.reputationAt(B, 5) == 0
    assert tuple(oracle.latestReputation(NODES[2].address)) == (0, 0)


def test_first_epoch_may_be_zero(oracle, roles):
    oracle.postEpoch(0, [A], [1], ROOT, {"from": roles["oracle"]})
    assert [int(e) for e in oracle.epochs()] == [0]
    with reverts("ReputationOracleEpochNotIncreasing", 0, 0):
        oracle.postEpoch(0, [A], [1], ROOT, {"from": roles["oracle"]})


def test_post_epoch_reverts(oracle, roles):
    o = {"from": roles["oracle"]}
    with reverts("AccessControlUnauthorizedAccount", roles["stranger"], oracle.ORACLE_ROLE()):
        oracle.postEpoch(1, [A], [1], ROOT, {"from": roles["stranger"]})
    with reverts("ReputationOracleLengthMismatch", 2, 1):
        oracle.postEpoch(1, [A, B], [1], ROOT, o)
    with reverts("ReputationOracleEmptyBatch"):
        oracle.postEpoch(1, [], [], ROOT, o)
    with reverts("ReputationOracleScoreTooHigh", B, 10_001):
        oracle.postEpoch(1, [A, B], [5, 10_001], ROOT, o)
    assert len(oracle.epochs()) == 0
    oracle.postEpoch(3, [A], [1], ROOT, o)
    with reverts("ReputationOracleEpochNotIncreasing", 3, 3):
        oracle.postEpoch(3, [A], [1], ROOT, o)
    with reverts("ReputationOracleEpochNotIncreasing", 2, 3):
        oracle.postEpoch(2, [A], [1], ROOT, o)


def test_unknown_epoch(oracle):
    with reverts("ReputationOracleUnknownEpoch", 7):
        oracle.epochInfo(7)
    with reverts("ReputationOracleUnknownEpoch", 7):
        oracle.verifyTelemetry(7, ROOT, [])


def test_verify_telemetry(oracle, roles):
    leaves = [keccak(text=f"telemetry-{i}") for i in range(4)]
    l01, l23 = _hash_pair(leaves[0], leaves[1]), _hash_pair(leaves[2], leaves[3])
    root = _hash_pair(l01, l23)
    oracle.postEpoch(1, [A], [1], root, {"from": roles["oracle"]})
    assert oracle.verifyTelemetry(1, leaves[2], [leaves[3], l01])
    assert oracle.verifyTelemetry(1, leaves[0], [leaves[1], l23])
    assert not oracle.verifyTelemetry(1, leaves[0], [leaves[2], l23])
    assert not oracle.verifyTelemetry(1, keccak(text="forged"), [leaves[1], l23])
