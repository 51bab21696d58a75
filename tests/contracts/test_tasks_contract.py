"""CrowdTasks: task creation, round anchors in order, events via anchors(), Merkle inclusion."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.chain import ChainClient, ChainConfig, ChainError, connect
from coordinator.contracts import CrowdContracts
from crowdfl.merkle import merkle_proof, merkle_root

ONE_ETHER = 10**18


def new_key() -> bytes:
    return os.urandom(32)


def _anchor(crowd: CrowdContracts, task_id: bytes, rnd: int, accepted: int = 7, rejected: int = 1) -> None:
    crowd.anchor_round(task_id, rnd, new_key(), new_key(), new_key(), accepted, rejected)


def test_create_task_reads_back(crowd: CrowdContracts) -> None:
    task_id, model = new_key(), new_key()
    deadline = int(time.time()) + 600
    crowd.create_task(task_id, model, 5, 1.25, deadline, reward_wei=ONE_ETHER)
    rec = crowd.task(task_id)
    assert (rec.task_id, rec.model_hash, rec.rounds, rec.deadline) == (task_id, model, 5, deadline)
    assert (rec.epsilon_milli, rec.epsilon, rec.pool_wei, rec.anchored_rounds) == (1250, 1.25, ONE_ETHER, 0)
    with pytest.raises(ChainError, match="task exists"):
        crowd.create_task(task_id, model, 5, 1.25, deadline)
    with pytest.raises(ChainError, match="no such task"):
        crowd.task(new_key())


def test_create_task_validation(crowd: CrowdContracts) -> None:
    future = int(time.time()) + 600
    with pytest.raises(ChainError, match="deadline passed"):
        crowd.create_task(new_key(), new_key(), 3, 1.0, 1)
    with pytest.raises(ValueError, match="rounds"):
        crowd.create_task(new_key(), new_key(), 0, 1.0, future)
    with pytest.raises(ValueError, match="epsilon"):
        crowd.create_task(new_key(), new_key(), 3, float("nan"), future)
    with pytest.raises(ValueError, match="epsilon"):
        crowd.create_task(new_key(), new_key(), 3, -1.0, future)


def test_anchor_rounds_in_order_once(crowd: CrowdContracts, make_task: Callable[..., bytes]) -> None:
    task_id = make_task(rounds=3)
    written = []
    for rnd in (1, 2):
        args = (new_key(), new_key(), new_key(), 10 + rnd, rnd)
        receipt = crowd.anchor_round(task_id, rnd, *args)
        written.append((rnd, args, receipt))

    with pytest.raises(ChainError, match="already anchored") as err:
        crowd.anchor_round(task_id, 2, new_key(), new_key(), new_key(), 1, 0)
    assert err.value.reverted
    with pytest.raises(ChainError, match="already anchored"):
        crowd.anchor_round(task_id, 1, new_key(), new_key(), new_key(), 1, 0)
    with pytest.raises(ChainError, match="no such round"):
        crowd.anchor_round(task_id, 4, new_key(), new_key(), new_key(), 1, 0)
    with pytest.raises(ChainError, match="no such task"):
        crowd.anchor_round(new_key(), 1, new_key(), new_key(), new_key(), 1, 0)

    anchors = crowd.anchors(task_id)
    assert [a.round for a in anchors] == [1, 2]
    for anchor, (rnd, (root, model, manifest, acc, rej), receipt) in zip(anchors, written, strict=True):
        assert (anchor.task_id, anchor.round) == (task_id, rnd)
        assert (anchor.merkle_root, anchor.model_hash, anchor.manifest_hash) == (root, model, manifest)
        assert (anchor.accepted, anchor.rejected) == (acc, rej)
        assert (anchor.tx_hash, anchor.block_number) == (receipt.tx_hash, receipt.block_number)
    assert crowd.task(task_id).anchored_rounds == 2


def test_out_of_order_reverts(crowd: CrowdContracts, make_task: Callable[..., bytes]) -> None:
    task_id = make_task(rounds=5)
    with pytest.raises(ChainError, match="out of order"):
        _anchor(crowd, task_id, 2)
    _anchor(crowd, task_id, 1)
    with pytest.raises(ChainError, match="out of order"):
        _anchor(crowd, task_id, 3)
    assert [a.round for a in crowd.anchors(task_id)] == [1]


def test_non_owner_cannot_anchor_or_create(
    crowd: CrowdContracts, stranger: CrowdContracts, make_task: Callable[..., bytes]
) -> None:
    task_id = make_task()
    with pytest.raises(ChainError, match="not owner"):
        _anchor(stranger, task_id, 1)
    with pytest.raises(ChainError, match="not owner"):
        stranger.create_task(new_key(), new_key(), 3, 1.0, int(time.time()) + 600)
    assert crowd.anchors(task_id) == []


def test_anchors_are_per_task(crowd: CrowdContracts, make_task: Callable[..., bytes]) -> None:
    a, b = make_task(), make_task()
    _anchor(crowd, a, 1)
    _anchor(crowd, b, 1)
    _anchor(crowd, a, 2)
    assert [x.round for x in crowd.anchors(a)] == [1, 2]
    assert [x.round for x in crowd.anchors(b)] == [1]
    assert crowd.anchors(make_task()) == []


def test_round_anchor_view_matches_event(
    client: ChainClient, crowd: CrowdContracts, make_task: Callable[..., bytes]
) -> None:
    task_id = make_task()
    _anchor(crowd, task_id, 1, accepted=9, rejected=4)
    (event,) = crowd.anchors(task_id)
    stored = client.call(crowd.tasks.functions.roundAnchor(task_id, 1))
    assert tuple(stored) == (
        event.merkle_root,
        event.model_hash,
        event.manifest_hash,
        9,
        4,
        event.block_number,
    )


# ---------------------------------------------------------------- Merkle: Python == Solidity


@pytest.fixture(scope="module")
def merkle_chain() -> Iterator[tuple[CrowdContracts, bytes]]:
    """One chain and one long task for the property test (hypothesis dislikes per-test fixtures)."""
    crowd = CrowdContracts.deploy(connect(ChainConfig(kind="embedded")))
    task_id = os.urandom(32)
    crowd.create_task(task_id, os.urandom(32), 10_000, 1.0, int(time.time()) + 3600)
    yield crowd, task_id


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 13])
def test_python_proofs_verify_on_chain(crowd: CrowdContracts, make_task: Callable[..., bytes], n: int) -> None:
    task_id = make_task(rounds=1)
    leaves = [new_key() for _ in range(n)]
    crowd.anchor_round(task_id, 1, merkle_root(leaves), new_key(), new_key(), n, 0)
    for i, leaf in enumerate(leaves):
        proof = merkle_proof(leaves, i)
        assert crowd.verify_inclusion(task_id, 1, leaf, proof)
        assert not crowd.verify_inclusion(task_id, 1, new_key(), proof)
        if proof:
            assert not crowd.verify_inclusion(task_id, 1, leaf, proof[:-1])
    # An un-anchored round proves nothing, not even the all-zero "root".
    assert not crowd.verify_inclusion(task_id, 2, leaves[0], merkle_proof(leaves, 0))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    leaves=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=24),
    data=st.data(),
)
def test_merkle_property_python_equals_contract(
    merkle_chain: tuple[CrowdContracts, bytes], leaves: list[bytes], data: st.DataObject
) -> None:
    crowd, task_id = merkle_chain
    rnd = crowd.task(task_id).anchored_rounds + 1
    crowd.anchor_round(task_id, rnd, merkle_root(leaves), os.urandom(32), os.urandom(32), len(leaves), 0)
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof = merkle_proof(leaves, index)
    assert crowd.verify_inclusion(task_id, rnd, leaves[index], proof)
    if proof:
        step = data.draw(st.integers(0, len(proof) - 1))
        bad = [p if i != step else bytes([p[0] ^ 1]) + p[1:] for i, p in enumerate(proof)]
        assert not crowd.verify_inclusion(task_id, rnd, leaves[index], bad)
