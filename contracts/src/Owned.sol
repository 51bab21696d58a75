// SPDX-License-Identifier: UNLICENSED
pragma solidity ^0.8.20;

/// @notice Single-owner access control. The owner is the manufacturer's
/// coordinator account; every state change that is not a withdrawal is its call.
abstract contract Owned {
    address public owner;

    event OwnershipTransferred(address indexed previousOwner, address indexed newOwner);

    modifier onlyOwner() {
        require(msg.sender == owner, "not owner");
        _;
    }

    constructor() {
        owner = msg.sender;
        emit OwnershipTransferred(address(0), msg.sender);
    }

    /// @notice Lets the manufacturer rotate its coordinator key without redeploying.
    function transferOwnership(address newOwner) external onlyOwner {
        require(newOwner != address(0), "zero owner");
        emit OwnershipTransferred(owner, newOwner);
        owner = newOwner;
    }
}
