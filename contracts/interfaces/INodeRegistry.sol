// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title INodeRegistry
/// @notice What settlement needs to know about nodes and models.
interface INodeRegistry {
    /// @notice Operator of a node signing key and whether the node may currently be routed/paid.
    /// @return operator zero address when the key is not registered
    /// @return routable registered, not deregistered, and operator at or above minimum stake
    function settlementInfo(address node) external view returns (address operator, bool routable);

    /// @notice Number of transformer layers of a registered model (0 when unknown).
    function modelLayers(bytes32 modelId) external view returns (uint32);
}
