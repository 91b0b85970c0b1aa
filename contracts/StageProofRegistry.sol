// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC5267} from "@openzeppelin/contracts/interfaces/IERC5267.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import {INodeRegistry} from "./interfaces/INodeRegistry.sol";

/// @notice The JobMarket getter the registry reads its NodeRegistry from.
interface IJobMarketRegistry {
    function registry() external view returns (INodeRegistry);
}

/// @notice What EZKL's reusable halo2 verifier exposes: one contract verifies proofs of any circuit
///         whose verification key artifact (VKA) was registered with it. The registry reaches
///         `verifyProof` with STATICCALL: a verifier that tried to write state would revert.
interface IHalo2VerifierReusable {
    function registerVka(bytes32[] calldata vka) external returns (bytes32 digest);

    function verifyProof(bytes calldata proof, uint256[] calldata instances, bytes32[] calldata vka)
        external
        view
        returns (bool success, bytes32 digest, int256[] memory rescaled);
}

/// @title StageProofRegistry
/// @notice The on-chain record of zero-knowledge proofs of the last stage of paid jobs: that a
///         routable node which signed a JobMarket receipt proved, with a halo2 proof this chain
///         checked, that the head of the receipt's model maps some committed input rows to logits
///         whose best entries are the tokens the receipt bills.
/// @dev A proof is recorded only when all of these hold, checked here:
///      1. the receipt (JobMarket EIP-712 `Receipt`) recovers to `node`, a node NodeRegistry
///         lists as routable (registered, staked), and it bills the model's last layers;
///      2. the node's EIP-712 `StageProof(receiptDigest, instancesHash, vkHash)` claim, in the
///         JobMarket's domain, recovers to the same node (the proof is bound to that receipt);
///      3. the circuit `vkHash` is registered for the receipt's model, `vka` is its registered
///         verification key artifact, and the verifier accepts `proof` over `instances` with it;
///      4. sha256 of `tokenIds` as little-endian int64 is the receipt's `outputHash`, and for
///         each token its proven logit is within the circuit's `tolerance` of its row's best.
///      Records are kept per (receipt digest, node): another key signing the same receipt fields
///      gets a record of its own and cannot block the node's. Readers match `node` against the
///      receipt JobMarket settled.
///      What it does not show: instance 0, the Poseidon commitment to the input rows, is recorded
///      but not checked here. Only off chain, against the previous stage's signed output (see
///      oracle/zk_verify.py), does it tie the proof to the job's activations: on its own a record
///      says the public head picks these tokens from *some* input.
///      Circuits are registered by CIRCUIT_ADMIN_ROLE, who vouches that the VKA is the one of the
///      key hashed to `vkHash` for that model's head (keys are reproducible from the public
///      weights and the SRS); each registration names its registrar. Recording is open to anyone
///      holding the signatures. The VKA travels in calldata with each proof (~7-11 KB for a
///      small head): storing it would cost more to read back than calldata costs.
contract StageProofRegistry is AccessControl {
    /// @notice Role allowed to register circuits (verification keys and their verifiers).
    bytes32 public constant CIRCUIT_ADMIN_ROLE = keccak256("CIRCUIT_ADMIN_ROLE");
    /// @notice JobMarket's EIP-712 receipt type (must equal JobMarket.RECEIPT_TYPEHASH).
    bytes32 public constant RECEIPT_TYPEHASH = keccak256(
        "Receipt(bytes32 jobId,bytes32 modelId,uint32 start,uint32 end,uint32 tokens,bytes32 outputHash,uint256 amount)"
    );
    /// @notice A node's EIP-712 claim that a proof is of the call its receipt bills.
    bytes32 public constant STAGE_PROOF_TYPEHASH =
        keccak256("StageProof(bytes32 receiptDigest,bytes32 instancesHash,bytes32 vkHash)");
    bytes32 private constant _DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    /// @dev BN254's scalar field: an instance above half of it encodes a negative value.
    uint256 private constant _BN254_R =
        21888242871839275222246405745257275088548364400416034343698204186575808495617;

    /// @notice A head circuit: its verifier and the keccak256 of its VKA words, the width of each
    ///         logits row and how far (in the circuit's fixed-point units) a billed token's logit
    ///         may sit below its row's best.
    struct Circuit {
        address verifier;
        uint32 vocab;
        uint64 tolerance;
        bytes32 vkaDigest;
        bytes32 modelId;
        address registrar;
    }

    /// @notice What was proven for a receipt.
    struct ProofRecord {
        address node;
        uint64 blockNumber;
        bytes32 vkHash;
        bytes32 instancesHash;
        uint256 inputCommitment;
    }

    /// @notice A JobMarket receipt as the node signed it (fields of the EIP-712 `Receipt`).
    struct Receipt {
        bytes32 jobId;
        bytes32 modelId;
        uint32 start;
        uint32 end;
        uint32 tokens;
        bytes32 outputHash;
        uint256 amount;
    }

    /// @notice The JobMarket whose receipts and domain the proofs are bound to.
    address public immutable market;
    /// @notice The NodeRegistry of that market (nodes' standing, models' layer counts).
    INodeRegistry public immutable nodeRegistry;
    bytes32 private immutable _hashedName;
    bytes32 private immutable _hashedVersion;

    mapping(bytes32 vkHash => Circuit) private _circuits;
    mapping(bytes32 receiptAndNode => ProofRecord) private _proofs;

    /// @notice A circuit was registered.
    event CircuitRegistered(
        bytes32 indexed vkHash,
        bytes32 indexed modelId,
        address indexed registrar,
        address verifier,
        bytes32 vkaDigest,
        uint32 vocab,
        uint64 tolerance
    );
    /// @notice A proof of the stage call billed by receipt `receiptDigest` was verified and recorded.
    event StageProven(
        bytes32 indexed receiptDigest,
        address indexed node,
        bytes32 indexed jobId,
        bytes32 vkHash,
        bytes32 instancesHash,
        uint256 inputCommitment
    );

    error StageProofRegistryZeroAddress();
    error StageProofRegistryCircuitExists(bytes32 vkHash, address verifier);
    error StageProofRegistryBadCircuit(bytes32 vkHash, uint32 vocab);
    error StageProofRegistryUnknownCircuit(bytes32 vkHash);
    error StageProofRegistryAlreadyProven(bytes32 receiptDigest, address node);
    error StageProofRegistryClaimNotBound(address receiptSigner, address claimSigner);
    error StageProofRegistryInstanceCount(uint256 instances, uint256 tokens, uint32 vocab);
    error StageProofRegistryOutputNotSigned(bytes32 outputHash, bytes32 computed);
    error StageProofRegistryTokenOutOfRange(uint256 index, uint64 tokenId, uint32 vocab);
    error StageProofRegistryTokenNotBest(uint256 index, uint64 tokenId, int256 gap, uint64 tolerance);
    error StageProofRegistryProofRejected(bytes32 vkHash);
    error StageProofRegistryWrongVka(bytes32 vkHash, bytes32 expected, bytes32 given);
    error StageProofRegistryUnknownModel(bytes32 modelId);
    error StageProofRegistryNodeNotRoutable(address node);
    error StageProofRegistryCircuitModelMismatch(bytes32 vkHash, bytes32 circuitModel, bytes32 receiptModel);
    error StageProofRegistryNotLastStage(uint32 end, uint32 layers);
    error StageProofRegistryInstanceOutOfField(uint256 index);

    /// @param market_ the JobMarket (its EIP-712 name and version are read once, ERC-5267)
    /// @param admin receives DEFAULT_ADMIN_ROLE (grants CIRCUIT_ADMIN_ROLE)
    constructor(address market_, address admin) {
        if (market_ == address(0) || admin == address(0)) revert StageProofRegistryZeroAddress();
        (, string memory name, string memory version,,,,) = IERC5267(market_).eip712Domain();
        market = market_;
        nodeRegistry = IJobMarketRegistry(market_).registry();
        _hashedName = keccak256(bytes(name));
        _hashedVersion = keccak256(bytes(version));
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @notice Register the head circuit of model `modelId` whose verification key hashes to
    ///         `vkHash`, and its VKA with `verifier`.
    /// @dev A registration is permanent: a key's verifier cannot be swapped under recorded proofs.
    /// @param vkHash keccak256 of the verification key file (what node claims name)
    /// @param verifier EZKL's reusable verifier contract
    /// @param vka the key's verification key artifact (EZKL `create_evm_vka`), as 32-byte words
    /// @param modelId the NodeRegistry model whose last stage's head the circuit is
    /// @param vocab width of each logits row the circuit outputs
    /// @param tolerance largest accepted gap below a row's best logit, in fixed-point units
    function registerCircuit(
        bytes32 vkHash,
        address verifier,
        bytes32[] calldata vka,
        bytes32 modelId,
        uint32 vocab,
        uint64 tolerance
    ) external onlyRole(CIRCUIT_ADMIN_ROLE) {
        if (verifier == address(0)) revert StageProofRegistryZeroAddress();
        if (vocab == 0 || vka.length == 0) revert StageProofRegistryBadCircuit(vkHash, vocab);
        if (nodeRegistry.modelLayers(modelId) == 0) revert StageProofRegistryUnknownModel(modelId);
        address existing = _circuits[vkHash].verifier;
        if (existing != address(0)) revert StageProofRegistryCircuitExists(vkHash, existing);
        bytes32 vkaDigest = keccak256(abi.encodePacked(vka));
        _circuits[vkHash] = Circuit(verifier, vocab, tolerance, vkaDigest, modelId, msg.sender);
        emit CircuitRegistered(vkHash, modelId, msg.sender, verifier, vkaDigest, vocab, tolerance);
        // the verifier refuses VKAs it has not seen; its registry is open, so this only adds ours
        bytes32 registered = IHalo2VerifierReusable(verifier).registerVka(vka);
        if (registered != vkaDigest) revert StageProofRegistryWrongVka(vkHash, vkaDigest, registered);
    }

    /// @notice Verify and record `node`'s proof of the last-stage call that `receipt` bills.
    /// @param receipt the node's receipt; `receiptSignature` its 65-byte signature
    /// @param vkHash the circuit the proof is for
    /// @param proof the halo2 proof bytes; `instances` its public inputs (input commitment, then
    ///        each token's logits row in order)
    /// @param vka the circuit's verification key artifact words (as registered)
    /// @param claimSignature the node's `StageProof` signature (65 bytes)
    /// @param tokenIds the sampled ids the receipt's outputHash is sha256 of (little-endian int64)
    /// @return node the receipt's signer, now on record
    function recordProof(
        Receipt calldata receipt,
        bytes calldata receiptSignature,
        bytes32 vkHash,
        bytes calldata proof,
        uint256[] calldata instances,
        bytes32[] calldata vka,
        bytes calldata claimSignature,
        uint64[] calldata tokenIds
    ) external returns (address node) {
        bytes32 separator = _marketSeparator();
        bytes32 receiptDigest = MessageHashUtils.toTypedDataHash(separator, _receiptHash(receipt));
        node = ECDSA.recover(receiptDigest, receiptSignature);
        (, bool routable) = nodeRegistry.settlementInfo(node);
        if (!routable) revert StageProofRegistryNodeNotRoutable(node);
        bytes32 slot = keccak256(abi.encode(receiptDigest, node));
        if (_proofs[slot].node != address(0)) revert StageProofRegistryAlreadyProven(receiptDigest, node);
        Circuit memory circuit = _circuits[vkHash];
        if (circuit.verifier == address(0)) revert StageProofRegistryUnknownCircuit(vkHash);
        if (receipt.modelId != circuit.modelId) {
            revert StageProofRegistryCircuitModelMismatch(vkHash, circuit.modelId, receipt.modelId);
        }
        uint32 layers = nodeRegistry.modelLayers(receipt.modelId);
        if (receipt.end != layers) revert StageProofRegistryNotLastStage(receipt.end, layers);
        bytes32 vkaDigest = keccak256(abi.encodePacked(vka));
        if (vkaDigest != circuit.vkaDigest) revert StageProofRegistryWrongVka(vkHash, circuit.vkaDigest, vkaDigest);
        bytes32 instancesHash = keccak256(abi.encodePacked(instances));
        bytes32 claimDigest = MessageHashUtils.toTypedDataHash(
            separator, keccak256(abi.encode(STAGE_PROOF_TYPEHASH, receiptDigest, instancesHash, vkHash))
        );
        address claimer = ECDSA.recover(claimDigest, claimSignature);
        if (claimer != node) revert StageProofRegistryClaimNotBound(node, claimer);
        _checkOutput(receipt.outputHash, instances, tokenIds, circuit);
        if (!_verifies(circuit.verifier, proof, instances, vka, vkaDigest)) revert StageProofRegistryProofRejected(vkHash);

        _proofs[slot] = ProofRecord(node, uint64(block.number), vkHash, instancesHash, instances[0]);
        emit StageProven(receiptDigest, node, receipt.jobId, vkHash, instancesHash, instances[0]);
    }

    /// @notice The circuit registered for `vkHash` (verifier zero if none).
    function circuitOf(bytes32 vkHash) external view returns (Circuit memory) {
        return _circuits[vkHash];
    }

    /// @notice The proof `node` recorded for its receipt with EIP-712 digest `receiptDigest`
    ///         (node zero if none).
    function proofOf(bytes32 receiptDigest, address node) external view returns (ProofRecord memory) {
        return _proofs[keccak256(abi.encode(receiptDigest, node))];
    }

    /// @notice The EIP-712 digest of `receipt` under the JobMarket's domain (what nodes sign).
    function receiptDigest(Receipt calldata receipt) external view returns (bytes32) {
        return MessageHashUtils.toTypedDataHash(_marketSeparator(), _receiptHash(receipt));
    }

    function _marketSeparator() private view returns (bytes32) {
        return keccak256(abi.encode(_DOMAIN_TYPEHASH, _hashedName, _hashedVersion, block.chainid, market));
    }

    function _receiptHash(Receipt calldata r) private pure returns (bytes32) {
        return keccak256(
            abi.encode(RECEIPT_TYPEHASH, r.jobId, r.modelId, r.start, r.end, r.tokens, r.outputHash, r.amount)
        );
    }

    /// @dev The receipt's output is exactly `tokenIds`, and each is a best entry of its proven row.
    function _checkOutput(
        bytes32 outputHash,
        uint256[] calldata instances,
        uint64[] calldata tokenIds,
        Circuit memory circuit
    ) private pure {
        uint256 n = tokenIds.length;
        uint256 vocab = circuit.vocab;
        if (n == 0 || instances.length != 1 + n * vocab) {
            revert StageProofRegistryInstanceCount(instances.length, n, circuit.vocab);
        }
        for (uint256 i = 0; i < instances.length; ++i) {
            if (instances[i] >= _BN254_R) revert StageProofRegistryInstanceOutOfField(i);
        }
        bytes memory packed = new bytes(8 * n);
        for (uint256 t = 0; t < n; ++t) {
            uint64 id = tokenIds[t];
            for (uint256 b = 0; b < 8; ++b) {
                packed[8 * t + b] = bytes1(uint8(id >> (8 * b)));
            }
        }
        bytes32 computed = sha256(packed);
        if (computed != outputHash) revert StageProofRegistryOutputNotSigned(outputHash, computed);
        for (uint256 t = 0; t < n; ++t) {
            uint64 id = tokenIds[t];
            if (id >= vocab) revert StageProofRegistryTokenOutOfRange(t, id, circuit.vocab);
            uint256 row = 1 + t * vocab;
            int256 best = _signed(instances[row]);
            for (uint256 v = 1; v < vocab; ++v) {
                int256 value = _signed(instances[row + v]);
                if (value > best) best = value;
            }
            int256 gap = best - _signed(instances[row + id]);
            if (gap > int256(uint256(circuit.tolerance))) {
                revert StageProofRegistryTokenNotBest(t, id, gap, circuit.tolerance);
            }
        }
    }

    /// @dev A field element as the signed fixed-point value it encodes.
    function _signed(uint256 felt) private pure returns (int256) {
        return felt > _BN254_R / 2 ? -int256(_BN254_R - felt) : int256(felt);
    }

    /// @dev The verifier's answer; a revert (what EZKL's verifiers do on a bad proof) is a no.
    ///      Called low-level: the reusable verifier returns `(success, digest)` followed by its
    ///      rescaled instances without an ABI offset word, which a typed call would fail to decode.
    function _verifies(
        address verifier,
        bytes calldata proof,
        uint256[] calldata instances,
        bytes32[] calldata vka,
        bytes32 vkaDigest
    ) private view returns (bool) {
        (bool done, bytes memory answer) =
            verifier.staticcall(abi.encodeCall(IHalo2VerifierReusable.verifyProof, (proof, instances, vka)));
        if (!done || answer.length < 64) return false;
        (uint256 success, bytes32 digest) = abi.decode(answer, (uint256, bytes32));
        return success == 1 && digest == vkaDigest;
    }
}
