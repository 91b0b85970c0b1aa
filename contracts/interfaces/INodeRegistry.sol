// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @dev The bit of a `settlementInfoOf` entry that says the node is routable.
uint256 constant ROUTABLE_BIT = 1 << 160;

/// @title INodeRegistry
/// @notice What settlement needs to know about nodes and models.
interface INodeRegistry {
    /// @notice Operator of a node signing key and whether the node may currently be routed/paid.
    /// @return operator zero address when the key is not registered
    /// @return routable registered, not deregistered, and operator at or above minimum stake
    function settlementInfo(address node) external view returns (address operator, bool routable);

    /// @notice Number of transformer layers of a registered model (0 when unknown).
    function modelLayers(bytes32 modelId) external view returns (uint32);

    /// @notice `modelLayers(modelId)` and `settlementInfo` of every key in `nodes`, in one call
    ///         (settling a job alone, or opening a Merkle batch, looks them all up at once).
    /// @return numLayers 0 when the model is unknown
    /// @return info per key: its operator in bits 0-159 (zero when the key is not registered)
    ///         and bit 160 (`ROUTABLE_BIT`) set when the node is routable, both as `settlementInfo`
    function settlementInfoOf(bytes32 modelId, address[] calldata nodes)
        external
        view
        returns (uint32 numLayers, uint256[] memory info);
}
