// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title IStakingManager
/// @notice What the registry needs to know about an operator's stake.
interface IStakingManager {
    /// @notice Stake that counts for routing (excludes stake that is unbonding).
    function activeStake(address operator) external view returns (uint256);

    /// @notice True when the operator's active stake is at least the minimum stake.
    function isActive(address operator) external view returns (bool);

    /// @notice `isActive` of up to 256 operators in one call: bit i of `mask` is
    ///         `isActive(operators[i])` (the registry checks all the nodes of a job at once).
    function areActive(address[] calldata operators) external view returns (uint256 mask);
}
