"""crowdfl.merkle: hand-computed trees plus properties (the contract side is in tests/contracts)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdfl.merkle import inner_node, leaf_node, merkle_proof, merkle_root, verify_proof


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _leaf(i: int) -> bytes:
    return bytes([i]) * 32


def _lf(x: bytes) -> bytes:
    return _h(b"\x00" + x)


def _in(a: bytes, b: bytes) -> bytes:
    return _h(b"\x01" + min(a, b) + max(a, b))


def test_one_leaf_root_is_its_leaf_node() -> None:
    assert merkle_root([_leaf(1)]) == _lf(_leaf(1))
    assert merkle_proof([_leaf(1)], 0) == []
    assert verify_proof(_leaf(1), [], _lf(_leaf(1)))


def test_two_leaves() -> None:
    a, b = _lf(_leaf(1)), _lf(_leaf(2))
    assert merkle_root([_leaf(1), _leaf(2)]) == _in(a, b)
    assert merkle_proof([_leaf(1), _leaf(2)], 0) == [b]
    assert merkle_proof([_leaf(1), _leaf(2)], 1) == [a]


def test_three_leaves_carries_odd_node_up() -> None:
    a, b, c = (_lf(_leaf(i)) for i in (1, 2, 3))
    leaves = [_leaf(1), _leaf(2), _leaf(3)]
    assert merkle_root(leaves) == _in(_in(a, b), c)
    # The carried-up leaf has no sibling at level 0, so its proof is one step.
    assert merkle_proof(leaves, 2) == [_in(a, b)]
    assert merkle_proof(leaves, 0) == [b, c]


def test_five_leaves_hand_computed() -> None:
    n = [_lf(_leaf(i)) for i in range(1, 6)]
    expected = _in(_in(_in(n[0], n[1]), _in(n[2], n[3])), n[4])
    leaves = [_leaf(i) for i in range(1, 6)]
    assert merkle_root(leaves) == expected
    # Pinned vector: changing the scheme must break this (and the contract with it).
    assert expected.hex() == "2ee61a0b2db2eeaf6a568ab9fe19d1863a002199970e9c5f09cd26bb252a2aa5"
    assert merkle_proof(leaves, 4) == [_in(_in(n[0], n[1]), _in(n[2], n[3]))]


def test_domain_separation() -> None:
    assert leaf_node(_leaf(7)) != inner_node(_leaf(7)[:16] * 2, _leaf(7))
    a, b = _lf(_leaf(1)), _lf(_leaf(2))
    # An inner node presented as a leaf must not verify against the root.
    assert not verify_proof(_in(a, b), [], merkle_root([_leaf(1), _leaf(2)]))


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda: merkle_root([]), "empty"),
        (lambda: merkle_root([b"\x00" * 31]), "32 bytes"),
        (lambda: merkle_root([_leaf(1), "x" * 32]), "must be bytes"),  # type: ignore[list-item]
        (lambda: merkle_root(_leaf(1)), "single"),  # type: ignore[arg-type]
        (lambda: merkle_proof([_leaf(1)], 1), "out of range"),
        (lambda: merkle_proof([_leaf(1)], -1), "out of range"),
        (lambda: merkle_proof([_leaf(1)], True), "int"),
        (lambda: verify_proof(_leaf(1), [b"\x01" * 33], _leaf(2)), "proof\\[0\\]"),
        (lambda: verify_proof(_leaf(1), [], b"\x01"), "root"),
        (lambda: verify_proof(b"", [], _leaf(2)), "leaf"),
    ],
)
def test_bad_input_raises_value_error(call: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        call()  # type: ignore[operator]


leaves_st = st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(leaves=leaves_st, data=st.data())
def test_every_proof_verifies_and_is_short(leaves: list[bytes], data: st.DataObject) -> None:
    root = merkle_root(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof = merkle_proof(leaves, index)
    assert verify_proof(leaves[index], proof, root)
    assert len(proof) <= (len(leaves) - 1).bit_length()


@settings(max_examples=150, deadline=None)
@given(leaves=leaves_st, data=st.data(), other=st.binary(min_size=32, max_size=32))
def test_foreign_leaf_does_not_verify(leaves: list[bytes], data: st.DataObject, other: bytes) -> None:
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof = merkle_proof(leaves, index)
    if other != leaves[index]:
        assert not verify_proof(other, proof, merkle_root(leaves))


@settings(max_examples=100, deadline=None)
@given(leaves=leaves_st, data=st.data())
def test_tampered_proof_or_root_fails(leaves: list[bytes], data: st.DataObject) -> None:
    root = merkle_root(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof = merkle_proof(leaves, index)
    flipped_root = bytes([root[0] ^ 1]) + root[1:]
    assert not verify_proof(leaves[index], proof, flipped_root)
    if proof:
        step = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[step] = bytes([bad[step][0] ^ 0x80]) + bad[step][1:]
        assert not verify_proof(leaves[index], bad, root)
        assert not verify_proof(leaves[index], proof[:-1], root)


@settings(max_examples=100, deadline=None)
@given(leaves=st.lists(st.binary(min_size=32, max_size=32), min_size=2, max_size=40, unique=True))
def test_root_commits_to_every_leaf(leaves: list[bytes]) -> None:
    root = merkle_root(leaves)
    changed = [bytes([leaves[-1][0] ^ 1]) + leaves[-1][1:]]
    if changed[0] not in leaves:
        assert merkle_root(leaves[:-1] + changed) != root
    assert merkle_root(leaves[:-1]) != root


@given(a=st.binary(min_size=32, max_size=32), b=st.binary(min_size=32, max_size=32))
def test_inner_node_is_order_independent(a: bytes, b: bytes) -> None:
    assert inner_node(a, b) == inner_node(b, a)
