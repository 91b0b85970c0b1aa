// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EnumerableSet} from "@openzeppelin/contracts/utils/structs/EnumerableSet.sol";
import {IStakingManager} from "./interfaces/IStakingManager.sol";
import {INodeRegistry, ROUTABLE_BIT} from "./interfaces/INodeRegistry.sol";

/// @title NodeRegistry
/// @notice Who may serve: worker nodes bound to staked operators, and the models they serve.
/// @dev A node's peer id is its claim, not exclusive: the contract cannot check a libp2p key's
///      signature, so first-come exclusivity would let anyone block a worker's registration by
///      claiming its peer id first. Off chain a claim is used only with the libp2p key's proof
///      (DHT records stored under a subkey the peer's RSA key owns; sessions over the peer's
///      Noise-authenticated stream, which serves an attestation signed by the node key).
///      A node is identified by its secp256k1 signing address. The node key signs an EIP-712
///      `NodeBinding` naming the operator, so an operator cannot claim a node it does not control
///      and a binding cannot be reused by another operator. A node is routable while it is
///      registered and its operator's active stake is at least the staking minimum; this is
///      evaluated live, so a slash below the minimum removes the node from routing at once.
contract NodeRegistry is INodeRegistry, EIP712 {
    using EnumerableSet for EnumerableSet.AddressSet;

    /// @notice EIP-712 type of the node key's consent to be operated by `operator`.
    bytes32 public constant NODE_BINDING_TYPEHASH =
        keccak256("NodeBinding(address operator,address node,string peerId,uint256 deadline)");

    /// @notice Hardware a node advertises.
    struct Capability {
        uint64 memoryMiB;
        uint64 gflops;
        uint32 bandwidthMbps;
        uint8 deviceClass; // 0 phone, 1 laptop, 2 desktop, 3 server, 4 datacenter GPU
    }

    /// @notice A registered node.
    struct Node {
        address operator;
        uint64 registeredAt;
        uint64 updatedAt;
        bool active;
        bytes32 attestationHash;
        Capability capability;
        string peerId;
        string endpoint;
    }

    /// @dev How a node is stored: the `Node` fields, with `active` packed next to `operator` so
    ///      settlement's per-node check (`settlementInfo`, `settlementInfoOf`) reads one slot.
    struct NodeRecord {
        address operator;
        bool active;
        uint64 registeredAt;
        uint64 updatedAt;
        bytes32 attestationHash;
        Capability capability;
        string peerId;
        string endpoint;
    }

    /// @notice What an operator submits to register a node.
    struct NodeRegistration {
        address node;
        string peerId;
        string endpoint;
        Capability capability;
        bytes32 attestationHash;
    }

    /// @notice A published model: its manifest lives on IPFS at `manifestCid`.
    struct Model {
        address publisher;
        uint32 numLayers;
        uint32 version;
        uint64 updatedAt;
        bytes32 manifestSha256;
        string manifestCid;
    }

    IStakingManager private immutable _staking;
    mapping(address node => NodeRecord) private _nodes;
    mapping(address operator => EnumerableSet.AddressSet) private _operatorNodes;
    EnumerableSet.AddressSet private _allNodes;
    mapping(bytes32 modelId => Model) private _models;
    bytes32[] private _modelIds;

    /// @notice A node was registered (or re-registered after deregistration).
    event NodeRegistered(
        address indexed node, address indexed operator, string peerId, string endpoint, bytes32 attestationHash
    );
    /// @notice A node's endpoint, capability or attestation changed.
    event NodeUpdated(address indexed node, string endpoint, bytes32 attestationHash);
    /// @notice A node was deregistered by its operator.
    event NodeDeregistered(address indexed node, address indexed operator);
    /// @notice A model was registered or updated to a new manifest. `modelId` is
    ///         `modelIdOf(publisher, nameHash)`.
    event ModelPublished(
        bytes32 indexed modelId,
        address indexed publisher,
        bytes32 indexed nameHash,
        uint32 version,
        string manifestCid,
        bytes32 manifestSha256,
        uint32 numLayers
    );

    error NodeRegistryZeroAddress();
    error NodeRegistryOperatorNotStaked(address operator);
    error NodeRegistryBindingExpired(uint256 deadline, uint256 now_);
    error NodeRegistryInvalidBinding(address recovered, address node);
    error NodeRegistryAlreadyRegistered(address node, address operator);
    error NodeRegistryNotOperator(address node, address caller);
    error NodeRegistryUnknownNode(address node);
    error NodeRegistryEmptyField(string field);
    error NodeRegistryUnknownModel(bytes32 modelId);
    error NodeRegistryInvalidModel(string reason);
    error NodeRegistryLayerCountFixed(bytes32 modelId, uint32 numLayers, uint32 given);

    /// @param staking_ the staking manager consulted for operator stake
    constructor(IStakingManager staking_) EIP712("DLIS NodeRegistry", "1") {
        if (address(staking_) == address(0)) revert NodeRegistryZeroAddress();
        _staking = staking_;
    }

    // ----------------------------------------------------------------------------- nodes

    /// @notice Register the node whose key signed `bindingSignature` under the caller as operator.
    /// @param reg the node's signing address, libp2p peer id, endpoint multiaddr, advertised
    ///        capability and keccak256 of its signed attestation report
    /// @param deadline the binding signature is valid until this timestamp
    /// @param bindingSignature the node key's EIP-712 signature over `NodeBinding`
    function registerNode(NodeRegistration calldata reg, uint256 deadline, bytes calldata bindingSignature) external {
        if (reg.node == address(0)) revert NodeRegistryZeroAddress();
        if (bytes(reg.peerId).length == 0) revert NodeRegistryEmptyField("peerId");
        if (bytes(reg.endpoint).length == 0) revert NodeRegistryEmptyField("endpoint");
        if (!_staking.isActive(msg.sender)) revert NodeRegistryOperatorNotStaked(msg.sender);
        _checkBinding(reg.node, reg.peerId, deadline, bindingSignature);
        NodeRecord storage n = _nodes[reg.node];
        if (n.active) revert NodeRegistryAlreadyRegistered(reg.node, n.operator);
        address previousOperator = n.operator;
        if (previousOperator != address(0) && previousOperator != msg.sender) {
            _operatorNodes[previousOperator].remove(reg.node);
        }
        n.operator = msg.sender;
        n.active = true;
        n.registeredAt = uint64(block.timestamp);
        n.updatedAt = uint64(block.timestamp);
        n.attestationHash = reg.attestationHash;
        n.capability = reg.capability;
        n.peerId = reg.peerId;
        n.endpoint = reg.endpoint;
        _operatorNodes[msg.sender].add(reg.node);
        _allNodes.add(reg.node);
        emit NodeRegistered(reg.node, msg.sender, reg.peerId, reg.endpoint, reg.attestationHash);
    }

    /// @notice Update a node's endpoint, capability and attestation hash. Operator only.
    function updateNode(address node, string calldata endpoint, Capability calldata capability, bytes32 attestationHash)
        external
    {
        NodeRecord storage n = _ownedActiveNode(node);
        if (bytes(endpoint).length == 0) revert NodeRegistryEmptyField("endpoint");
        n.endpoint = endpoint;
        n.capability = capability;
        n.attestationHash = attestationHash;
        n.updatedAt = uint64(block.timestamp);
        emit NodeUpdated(node, endpoint, attestationHash);
    }

    /// @notice Remove a node from routing. Operator only. The record stays readable.
    function deregisterNode(address node) external {
        NodeRecord storage n = _ownedActiveNode(node);
        n.active = false;
        n.updatedAt = uint64(block.timestamp);
        emit NodeDeregistered(node, msg.sender);
    }

    // ----------------------------------------------------------------------------- models

    /// @notice Register a model under the caller's namespace, or publish a new version of it.
    ///         The model's id is `modelIdOf(msg.sender, nameHash)`: a name can be published by
    ///         anyone, but only in their own namespace, so no one can squat another publisher's
    ///         model id or publish versions of it. Brokers and workers choose whose namespace
    ///         they serve (`chain.model_publisher` in the Python settings).
    ///         The layer count is fixed by the first version: a later version with another count
    ///         reverts, since receipts of jobs already served cover [0, numLayers) of the first
    ///         count and would all become unsettleable.
    /// @param nameHash keccak256 of the model's name (e.g. keccak256("smollm2-135m"))
    /// @param manifestCid IPFS CID of the shard manifest
    /// @param manifestSha256 sha256 of the manifest bytes
    /// @param numLayers transformer layers in the model
    /// @return modelId the id receipts and job authorizations name
    function publishModel(bytes32 nameHash, string calldata manifestCid, bytes32 manifestSha256, uint32 numLayers)
        external
        returns (bytes32 modelId)
    {
        if (nameHash == bytes32(0)) revert NodeRegistryInvalidModel("nameHash is zero");
        if (bytes(manifestCid).length == 0) revert NodeRegistryEmptyField("manifestCid");
        if (manifestSha256 == bytes32(0)) revert NodeRegistryInvalidModel("manifestSha256 is zero");
        if (numLayers == 0) revert NodeRegistryInvalidModel("numLayers is zero");
        modelId = modelIdOf(msg.sender, nameHash);
        Model storage m = _models[modelId];
        if (m.publisher == address(0)) {
            m.publisher = msg.sender;
            _modelIds.push(modelId);
        } else if (m.numLayers != numLayers) {
            revert NodeRegistryLayerCountFixed(modelId, m.numLayers, numLayers);
        }
        m.version += 1;
        m.numLayers = numLayers;
        m.manifestCid = manifestCid;
        m.manifestSha256 = manifestSha256;
        m.updatedAt = uint64(block.timestamp);
        emit ModelPublished(modelId, msg.sender, nameHash, m.version, manifestCid, manifestSha256, numLayers);
    }

    /// @notice The id of the model `publisher` publishes under the name hashed to `nameHash`:
    ///         keccak256(abi.encode(publisher, nameHash)).
    function modelIdOf(address publisher, bytes32 nameHash) public pure returns (bytes32) {
        return keccak256(abi.encode(publisher, nameHash));
    }

    // ----------------------------------------------------------------------------- views

    /// @inheritdoc INodeRegistry
    function settlementInfo(address node) external view returns (address operator, bool routable) {
        NodeRecord storage n = _nodes[node];
        operator = n.operator;
        routable = n.active && _staking.isActive(operator);
    }

    /// @inheritdoc INodeRegistry
    function settlementInfoOf(bytes32 modelId, address[] calldata nodes)
        external
        view
        returns (uint32 numLayers, uint256[] memory info)
    {
        numLayers = _models[modelId].numLayers;
        uint256 n = nodes.length;
        if (n > 256) {
            // more keys than one staking mask holds: each operator's stake checked on its own
            info = new uint256[](n);
            for (uint256 i = 0; i < n; ++i) {
                NodeRecord storage r = _nodes[nodes[i]];
                address operator = r.operator;
                info[i] = (r.active && _staking.isActive(operator) ? ROUTABLE_BIT : 0) | uint160(operator);
            }
            return (numLayers, info);
        }
        address[] memory operators = new address[](n);
        uint256 activeNodes = 0; // bit i: node i is registered and not deregistered
        for (uint256 i = 0; i < n; ++i) {
            NodeRecord storage r = _nodes[nodes[i]];
            operators[i] = r.operator;
            if (r.active) activeNodes |= 1 << i;
        }
        uint256 routable = activeNodes & _staking.areActive(operators); // one staking call for all
        assembly ("memory-safe") {
            // the operators become the entries: same memory layout (length, then one word each),
            // each entry gets its routable bit
            info := operators
        }
        for (uint256 i = 0; i < n; ++i) {
            info[i] |= ((routable >> i) & 1) << 160;
        }
    }

    /// @inheritdoc INodeRegistry
    function modelLayers(bytes32 modelId) external view returns (uint32) {
        return _models[modelId].numLayers;
    }

    /// @notice True when the node is registered and its operator meets the minimum stake.
    function isRoutable(address node) public view returns (bool) {
        NodeRecord storage n = _nodes[node];
        return n.active && _staking.isActive(n.operator);
    }

    /// @notice Full record of a node (reverts for a key that was never registered).
    function getNode(address node) external view returns (Node memory) {
        NodeRecord storage r = _nodes[node];
        if (r.operator == address(0)) revert NodeRegistryUnknownNode(node);
        return Node(
            r.operator, r.registeredAt, r.updatedAt, r.active, r.attestationHash, r.capability, r.peerId, r.endpoint
        );
    }

    /// @notice Signing addresses of the nodes an operator has registered.
    function nodesOf(address operator) external view returns (address[] memory) {
        return _operatorNodes[operator].values();
    }

    /// @notice Number of node keys ever registered.
    function nodeCount() external view returns (uint256) {
        return _allNodes.length();
    }

    /// @notice Node key at `index` in registration order (for enumeration).
    function nodeAt(uint256 index) external view returns (address) {
        return _allNodes.at(index);
    }

    /// @notice A model's current manifest (reverts for an unknown model).
    function getModel(bytes32 modelId) external view returns (Model memory) {
        Model memory m = _models[modelId];
        if (m.publisher == address(0)) revert NodeRegistryUnknownModel(modelId);
        return m;
    }

    /// @notice Ids of all models ever published.
    function modelIds() external view returns (bytes32[] memory) {
        return _modelIds;
    }

    /// @notice The staking manager this registry consults.
    function staking() external view returns (IStakingManager) {
        return _staking;
    }

    /// @notice The EIP-712 domain separator for `NodeBinding` signatures.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function _checkBinding(address node, string calldata peerId, uint256 deadline, bytes calldata signature)
        private
        view
    {
        if (block.timestamp > deadline) revert NodeRegistryBindingExpired(deadline, block.timestamp);
        bytes32 digest = _hashTypedDataV4(
            keccak256(abi.encode(NODE_BINDING_TYPEHASH, msg.sender, node, keccak256(bytes(peerId)), deadline))
        );
        (address recovered, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, signature);
        if (err != ECDSA.RecoverError.NoError || recovered != node) {
            revert NodeRegistryInvalidBinding(recovered, node);
        }
    }

    function _ownedActiveNode(address node) private view returns (NodeRecord storage n) {
        n = _nodes[node];
        if (!n.active) revert NodeRegistryUnknownNode(node);
        if (n.operator != msg.sender) revert NodeRegistryNotOperator(node, msg.sender);
    }
}
