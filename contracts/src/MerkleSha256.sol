// SPDX-License-Identifier: UNLICENSED
pragma solidity ^0.8.20;

/// @notice Inclusion proofs for the tree built by crowdfl/merkle.py.
/// leaf node = sha256(0x00 || leaf); inner node = sha256(0x01 || min(a,b) || max(a,b)).
/// The 0x00/0x01 prefixes stop an inner node from being passed off as a leaf;
/// sorted pairs mean a proof needs no left/right bits. An odd node is carried up
/// unchanged, so a proof simply has no sibling for that level.
library MerkleSha256 {
    function leafNode(bytes32 leaf) internal pure returns (bytes32) {
        return sha256(abi.encodePacked(bytes1(0x00), leaf));
    }

    function innerNode(bytes32 a, bytes32 b) internal pure returns (bytes32) {
        return a < b
            ? sha256(abi.encodePacked(bytes1(0x01), a, b))
            : sha256(abi.encodePacked(bytes1(0x01), b, a));
    }

    function verify(bytes32 leaf, bytes32[] calldata proof, bytes32 root) internal pure returns (bool) {
        bytes32 node = leafNode(leaf);
        for (uint256 i = 0; i < proof.length; ++i) {
            node = innerNode(node, proof[i]);
        }
        return node == root;
    }
}
