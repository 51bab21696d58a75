"""Merkle tree over 32-byte leaves, bit-for-bit the scheme of contracts/src/MerkleSha256.sol.

leaf node = sha256(0x00 || leaf); inner node = sha256(0x01 || min(a, b) || max(a, b)).
The prefixes keep an inner node from posing as a leaf (second-preimage); sorting each
pair lets a proof be a bare list of siblings, which is what the contract verifies.
An odd node at the end of a level is carried up unchanged, so it adds no proof step.
Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

LEAF_SIZE = 32
_LEAF_PREFIX = b"\x00"
_INNER_PREFIX = b"\x01"


def leaf_node(leaf: bytes) -> bytes:
    """Hash a leaf into its tree node."""
    _check_node(leaf, "leaf")
    return hashlib.sha256(_LEAF_PREFIX + leaf).digest()


def inner_node(a: bytes, b: bytes) -> bytes:
    """Hash two child nodes, order-independent."""
    lo, hi = (a, b) if a < b else (b, a)
    return hashlib.sha256(_INNER_PREFIX + lo + hi).digest()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root of the tree over `leaves`; a one-leaf tree's root is its leaf node."""
    level = _leaf_level(leaves)
    while len(level) > 1:
        level = _next_level(level)
    return level[0]


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Siblings from the leaf at `index` up to the root (levels where it is carried up have none)."""
    level = _leaf_level(leaves)
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"index must be an int, got {type(index).__name__}")
    if not 0 <= index < len(level):
        raise ValueError(f"index {index} out of range for {len(level)} leaves")
    proof: list[bytes] = []
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        level = _next_level(level)
        index //= 2
    return proof


def verify_proof(leaf: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    """True when `proof` links `leaf` to `root`; malformed input raises ValueError."""
    _check_node(root, "root")
    node = leaf_node(leaf)
    for i, sibling in enumerate(proof):
        _check_node(sibling, f"proof[{i}]")
        node = inner_node(node, sibling)
    return node == root


def _leaf_level(leaves: Sequence[bytes]) -> list[bytes]:
    if isinstance(leaves, (bytes, bytearray, memoryview, str)):
        raise ValueError("leaves must be a sequence of 32-byte values, not a single bytes/str")
    if len(leaves) == 0:
        raise ValueError("empty tree has no root")
    level = []
    for i, leaf in enumerate(leaves):
        _check_node(leaf, f"leaves[{i}]")
        level.append(leaf_node(leaf))
    return level


def _next_level(level: list[bytes]) -> list[bytes]:
    nxt = [inner_node(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        nxt.append(level[-1])
    return nxt


def _check_node(value: bytes, what: str) -> None:
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"{what} must be bytes, got {type(value).__name__}")
    if len(value) != LEAF_SIZE:
        raise ValueError(f"{what} must be {LEAF_SIZE} bytes, got {len(value)}")
