// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

/// @title ReputationOracle
/// @notice Per-epoch reputation scores (basis points) of nodes, posted by the off-chain oracle
///         together with the Merkle root of the telemetry they were computed from, so anyone can
///         check that a telemetry record was part of an epoch.
contract ReputationOracle is AccessControl {
    /// @notice Role allowed to post epochs.
    bytes32 public constant ORACLE_ROLE = keccak256("ORACLE_ROLE");
    uint16 private constant _MAX_SCORE = 10_000;

    struct Epoch {
        bytes32 telemetryRoot;
        uint64 postedAt;
        uint32 nodeCount;
    }

    struct Score {
        uint16 scoreBps;
        uint64 epoch;
    }

    uint64 private _latestEpoch;
    bool private _anyPosted;
    uint64[] private _epochs;
    mapping(uint64 epoch => Epoch) private _epochInfo;
    mapping(uint64 epoch => mapping(address node => uint16)) private _scoreAt;
    mapping(address node => Score) private _latest;

    /// @notice An epoch was posted.
    event EpochPosted(uint64 indexed epoch, bytes32 telemetryRoot, uint32 nodeCount);
    /// @notice A node's reputation for `epoch` was recorded.
    event ReputationUpdated(address indexed node, uint64 indexed epoch, uint16 scoreBps);

    error ReputationOracleEpochNotIncreasing(uint64 epoch, uint64 latest);
    error ReputationOracleLengthMismatch(uint256 nodes, uint256 scores);
    error ReputationOracleScoreTooHigh(address node, uint16 scoreBps);
    error ReputationOracleEmptyBatch();
    error ReputationOracleUnknownEpoch(uint64 epoch);

    /// @param admin receives DEFAULT_ADMIN_ROLE (grants ORACLE_ROLE)
    constructor(address admin) {
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @notice Post the scores of `nodes` for `epoch` with the telemetry Merkle root.
    /// @dev Epochs strictly increase. Scores are in basis points (0..10000).
    function postEpoch(uint64 epoch, address[] calldata nodes, uint16[] calldata scoresBps, bytes32 telemetryRoot)
        external
        onlyRole(ORACLE_ROLE)
    {
        if (_anyPosted && epoch <= _latestEpoch) revert ReputationOracleEpochNotIncreasing(epoch, _latestEpoch);
        if (nodes.length != scoresBps.length) revert ReputationOracleLengthMismatch(nodes.length, scoresBps.length);
        if (nodes.length == 0) revert ReputationOracleEmptyBatch();
        _anyPosted = true;
        _latestEpoch = epoch;
        _epochs.push(epoch);
        _epochInfo[epoch] = Epoch(telemetryRoot, uint64(block.timestamp), uint32(nodes.length));
        for (uint256 i = 0; i < nodes.length; ++i) {
            uint16 s = scoresBps[i];
            if (s > _MAX_SCORE) revert ReputationOracleScoreTooHigh(nodes[i], s);
            _scoreAt[epoch][nodes[i]] = s;
            _latest[nodes[i]] = Score(s, epoch);
            emit ReputationUpdated(nodes[i], epoch, s);
        }
        emit EpochPosted(epoch, telemetryRoot, uint32(nodes.length));
    }

    /// @notice A node's most recent score and the epoch it is from (0, 0 when never scored).
    function latestReputation(address node) external view returns (uint16 scoreBps, uint64 epoch) {
        Score memory s = _latest[node];
        return (s.scoreBps, s.epoch);
    }

    /// @notice A node's score in a given epoch (0 when not scored in it).
    function reputationAt(address node, uint64 epoch) external view returns (uint16) {
        return _scoreAt[epoch][node];
    }

    /// @notice Telemetry root, posting time and batch size of an epoch.
    function epochInfo(uint64 epoch) external view returns (Epoch memory info) {
        info = _epochInfo[epoch];
        if (info.postedAt == 0) revert ReputationOracleUnknownEpoch(epoch);
    }

    /// @notice The latest posted epoch (0 before any).
    function latestEpoch() external view returns (uint64) {
        return _latestEpoch;
    }

    /// @notice All posted epochs in order.
    function epochs() external view returns (uint64[] memory) {
        return _epochs;
    }

    /// @notice Check that `leaf` was part of the telemetry of `epoch`.
    function verifyTelemetry(uint64 epoch, bytes32 leaf, bytes32[] calldata proof) external view returns (bool) {
        Epoch memory info = _epochInfo[epoch];
        if (info.postedAt == 0) revert ReputationOracleUnknownEpoch(epoch);
        return MerkleProof.verifyCalldata(proof, info.telemetryRoot, leaf);
    }
}
