"""Binding of contracts/NodeRegistry.sol: nodes bound to staked operators, and models."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.types import TxReceipt

from dlis_market.chain.client import ChainClient
from dlis_market.chain.dlis_token import fmt_units
from dlis_market.chain.errors import PreflightError
from dlis_market.chain.staking_manager import StakingManager
from dlis_market.chain.typed_data import REGISTRY_DOMAIN, CompactSignature, Domain, sign_typed
from dlis_market.types import model_id, name_hash

BINDING_TTL_S = 3600


class DeviceClass(IntEnum):
    PHONE = 0
    LAPTOP = 1
    DESKTOP = 2
    SERVER = 3
    DATACENTER_GPU = 4


@dataclass(frozen=True)
class Capability:
    memory_mib: int
    gflops: int
    bandwidth_mbps: int
    device_class: DeviceClass

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.memory_mib, self.gflops, self.bandwidth_mbps, int(self.device_class))


@dataclass(frozen=True)
class NodeRecord:
    node: str
    operator: str
    registered_at: int
    updated_at: int
    active: bool
    attestation_hash: bytes
    capability: Capability
    peer_id: str
    endpoint: str
    routable: bool


@dataclass(frozen=True)
class ModelRecord:
    model_id: bytes
    publisher: str
    num_layers: int
    version: int
    updated_at: int
    manifest_sha256: bytes
    manifest_cid: str


class NodeRegistry:
    def __init__(self, client: ChainClient):
        self.client = client
        self.contract = client.contract("NodeRegistry")
        self.address = self.contract.address
        self.staking = StakingManager(client)

    def domain(self) -> Domain:
        return Domain(REGISTRY_DOMAIN[0], REGISTRY_DOMAIN[1], self.client.chain_id, self.address)

    def sign_binding(self, node_key: LocalAccount, operator: str, peer_id: str, deadline: int) -> CompactSignature:
        """The node key's consent to be operated by ``operator`` (EIP-712 ``NodeBinding``)."""
        message = {"operator": operator, "node": node_key.address, "peerId": peer_id, "deadline": deadline}
        return sign_typed(node_key.key, self.domain(), "NodeBinding", message)

    # ------------------------------------------------------------------ nodes

    def register(
        self,
        operator: LocalAccount,
        node: str,
        peer_id: str,
        endpoint: str,
        capability: Capability,
        attestation_hash: bytes,
        binding: CompactSignature,
        deadline: int,
    ) -> TxReceipt:
        info = self.staking.info(operator.address)
        if not info.is_active:
            raise PreflightError(
                f"operator {operator.address} has {fmt_units(info.active)} DLIS active stake, minimum is "
                f"{fmt_units(info.min_stake)}; stake more first (`dlis node stake AMOUNT`)"
            )
        existing = self.get(node)
        if existing is not None and existing.active:
            raise PreflightError(
                f"node {node} is already registered to operator {existing.operator}; "
                "use `dlis node register --update` to change its endpoint or capability"
            )
        reg = (Web3.to_checksum_address(node), peer_id, endpoint, capability.as_tuple(), attestation_hash)
        return self.client.transact(operator, self.contract.functions.registerNode(reg, deadline, binding.signature))

    def update(
        self, operator: LocalAccount, node: str, endpoint: str, capability: Capability, attestation_hash: bytes
    ) -> TxReceipt:
        fn = self.contract.functions.updateNode(node, endpoint, capability.as_tuple(), attestation_hash)
        return self.client.transact(operator, fn)

    def deregister(self, operator: LocalAccount, node: str) -> TxReceipt:
        return self.client.transact(operator, self.contract.functions.deregisterNode(node))

    def get(self, node: str) -> NodeRecord | None:
        f = self.contract.functions
        node = Web3.to_checksum_address(node)
        operator, _ = f.settlementInfo(node).call()
        if int(operator, 16) == 0:
            return None
        raw = f.getNode(node).call()
        op, registered, updated, active, att, cap, peer_id, endpoint = raw
        return NodeRecord(
            node=node,
            operator=op,
            registered_at=int(registered),
            updated_at=int(updated),
            active=bool(active),
            attestation_hash=bytes(att),
            capability=Capability(int(cap[0]), int(cap[1]), int(cap[2]), DeviceClass(int(cap[3]))),
            peer_id=peer_id,
            endpoint=endpoint,
            routable=bool(f.isRoutable(node).call()),
        )

    def nodes_of(self, operator: str) -> list[str]:
        return list(self.contract.functions.nodesOf(operator).call())

    def all_nodes(self) -> list[NodeRecord]:
        f = self.contract.functions
        out = []
        for i in range(int(f.nodeCount().call())):
            rec = self.get(f.nodeAt(i).call())
            if rec is not None:
                out.append(rec)
        return out

    # ------------------------------------------------------------------ models

    def publish_model(
        self, publisher: LocalAccount, name: str, manifest_cid: str, manifest_sha256: bytes, num_layers: int
    ) -> bytes:
        """Publish ``name`` (or a new version of it) in ``publisher``'s namespace; returns its model id."""
        mid = bytes.fromhex(model_id(name, publisher.address)[2:])
        fn = self.contract.functions.publishModel(name_hash(name), manifest_cid, manifest_sha256, num_layers)
        self.client.transact(publisher, fn)
        return mid

    def get_model(self, model_id: bytes) -> ModelRecord | None:
        f = self.contract.functions
        if int(f.modelLayers(model_id).call()) == 0:
            return None
        publisher, layers, version, updated, sha, cid = f.getModel(model_id).call()
        return ModelRecord(model_id, publisher, int(layers), int(version), int(updated), bytes(sha), cid)

    def model_ids(self) -> list[bytes]:
        return [bytes(m) for m in self.contract.functions.modelIds().call()]
