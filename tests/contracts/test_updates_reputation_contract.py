"""Per-update anchoring baseline and per-round reputation: both refuse keys no longer enrolled."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from coordinator.chain import ChainClient, ChainError
from coordinator.contracts import CrowdContracts


def new_key() -> bytes:
    return os.urandom(32)


def test_anchor_update_needs_enrolled_keys(
    client: ChainClient, crowd: CrowdContracts, make_task: Callable[..., bytes], enrolled: dict[str, list[bytes]]
) -> None:
    task_id = make_task(rounds=2)
    edge, device = enrolled["edges"][0], enrolled["devices"][0]
    update = new_key()
    crowd.anchor_update(task_id, 1, update, edge, device)
    assert client.call(crowd.tasks.functions.updateRound(task_id, update)) == 1
    with pytest.raises(ChainError, match="update exists"):
        crowd.anchor_update(task_id, 1, update, edge, device)

    crowd.remove(device)
    with pytest.raises(ChainError, match="inactive device") as err:
        crowd.anchor_update(task_id, 1, new_key(), edge, device)
    assert err.value.reverted
    crowd.remove(edge)
    with pytest.raises(ChainError, match="inactive edge"):
        crowd.anchor_update(task_id, 1, new_key(), edge, enrolled["devices"][1])
    # Roles are checked too: a device key cannot stand in for an edge.
    with pytest.raises(ChainError, match="inactive edge"):
        crowd.anchor_update(task_id, 1, new_key(), enrolled["devices"][1], enrolled["devices"][2])


def test_anchor_update_round_bounds(
    crowd: CrowdContracts, make_task: Callable[..., bytes], enrolled: dict[str, list[bytes]]
) -> None:
    task_id = make_task(rounds=2)
    edge, device = enrolled["edges"][0], enrolled["devices"][0]
    crowd.anchor_round(task_id, 1, new_key(), new_key(), new_key(), 1, 0)
    with pytest.raises(ChainError, match="round closed"):
        crowd.anchor_update(task_id, 1, new_key(), edge, device)
    with pytest.raises(ChainError, match="no such round"):
        crowd.anchor_update(task_id, 3, new_key(), edge, device)
    crowd.anchor_update(task_id, 2, new_key(), edge, device)


def test_set_scores_once_per_round(
    crowd: CrowdContracts, make_task: Callable[..., bytes], enrolled: dict[str, list[bytes]]
) -> None:
    task_id = make_task(rounds=3)
    d = enrolled["devices"]
    crowd.set_scores(task_id, 1, {d[0]: 0.875, d[1]: 0.5, enrolled["edges"][0]: 1.0})
    assert crowd.reputation_of(d[0]) == 0.875
    assert crowd.reputation_of(d[1]) == 0.5
    assert crowd.reputation_of(d[2]) == 0.0
    with pytest.raises(ChainError, match="already scored"):
        crowd.set_scores(task_id, 1, {d[0]: 0.1})
    crowd.set_scores(task_id, 2, {d[0]: 0.25})
    assert crowd.reputation_of(d[0]) == 0.25
    with pytest.raises(ValueError, match="finite"):
        crowd.set_scores(task_id, 3, {d[0]: -0.5})


def test_set_scores_refuses_removed_key(
    crowd: CrowdContracts, make_task: Callable[..., bytes], enrolled: dict[str, list[bytes]]
) -> None:
    task_id = make_task(rounds=2)
    d = enrolled["devices"]
    crowd.remove(d[1])
    with pytest.raises(ChainError, match="inactive key"):
        crowd.set_scores(task_id, 1, {d[0]: 0.9, d[1]: 0.9})
    assert crowd.reputation_of(d[0]) == 0.0  # the whole round was refused
    with pytest.raises(ChainError, match="inactive key"):
        crowd.set_scores(task_id, 1, {new_key(): 0.9})
    crowd.set_scores(task_id, 1, {d[0]: 0.9})  # the round is still open after the refusals
    assert crowd.reputation_of(d[0]) == 0.9


def test_scores_non_owner(
    stranger: CrowdContracts, make_task: Callable[..., bytes], enrolled: dict[str, list[bytes]]
) -> None:
    task_id = make_task()
    with pytest.raises(ChainError, match="not owner"):
        stranger.set_scores(task_id, 1, {enrolled["devices"][0]: 1.0})
    with pytest.raises(ChainError, match="not owner"):
        stranger.anchor_update(task_id, 1, new_key(), enrolled["edges"][0], enrolled["devices"][0])
