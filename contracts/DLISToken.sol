// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";

/// @title DLISToken
/// @notice The marketplace's ERC-20 unit of account (18 decimals) with EIP-2612 `permit`, so
///         clients and operators can approve escrow and stake with a signature instead of a
///         separate transaction.
/// @dev The whole supply is minted once at deployment; there is no owner and no later minting.
contract DLISToken is ERC20, ERC20Permit {
    /// @param initialHolder receives the entire fixed supply
    /// @param initialSupply total supply in token units (18 decimals)
    constructor(address initialHolder, uint256 initialSupply) ERC20("DLIS Token", "DLIS") ERC20Permit("DLIS Token") {
        _mint(initialHolder, initialSupply);
    }
}
