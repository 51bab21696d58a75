"""Settlement in constant gas: one root per round, claimed by proof, once, only after the anchor."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from coordinator.chain import ChainClient, ChainError
from coordinator.contracts import CrowdContracts, Role
from coordinator.settlement import leaf_hash, settle
from tests.contracts.conftest import new_key

ONE_ETHER = 10**18


def _ledger(task_id: bytes, round_: int, customers: dict[bytes, tuple[float, int]]) -> dict[str, object]:
    return {
        "task_id": task_id.hex(), "round": round_,
        "scores": {k.hex(): 1.0 for k in customers},
        "reputation_after": {k.hex(): rep for k, (rep, _) in customers.items()},
        "rewards": {k.hex(): str(wei) for k, (_, wei) in customers.items()},
    }


def test_claims_pay_each_leaf_once_to_the_payout(
    client: ChainClient, crowd: CrowdContracts, make_task: Callable[..., bytes], stranger: CrowdContracts
) -> None:
    task_id = make_task(rounds=2, reward_wei=ONE_ETHER)
    keys = [new_key() for _ in range(5)]
    payouts = {k: client.new_account().address for k in keys}
    crowd.register_many([(k, Role.DEVICE, payouts[k]) for k in keys])
    plan = settle(_ledger(task_id, 1, {k: (0.5 + i / 10, (i + 1) * 10**15) for i, k in enumerate(keys)}))
    with pytest.raises(ChainError, match="round not anchored"):  # settlement only after its anchor
        crowd.settle_round(task_id, 1, plan.root, plan.total_wei, len(plan.leaves))
    crowd.anchor_round(task_id, 1, new_key(), new_key(), new_key(), 5, 0)
    crowd.settle_round(task_id, 1, plan.root, plan.total_wei, len(plan.leaves))
    assert crowd.task(task_id).pool_wei == ONE_ETHER - plan.total_wei
    st = crowd.settlement(task_id, 1)
    assert st is not None and (st.root, st.total_wei, st.customers) == (plan.root, plan.total_wei, 5)
    with pytest.raises(ChainError, match="out of order"):
        crowd.settle_round(task_id, 1, plan.root, 0, 0)

    leaf, proof = plan.proof(keys[2].hex())
    # the contract's leaf is the Python leaf, byte for byte
    assert client.call(crowd.tasks.functions.settlementLeaf(task_id, 1, keys[2], leaf.reputation_milli, leaf.amount_wei)) == leaf_hash(task_id.hex(), 1, leaf)
    with pytest.raises(ChainError, match="bad proof"):  # a larger amount than the leaf says
        stranger.claim(task_id, 1, keys[2], leaf.reputation_milli, leaf.amount_wei + 1, proof)
    stranger.claim(task_id, 1, keys[2], leaf.reputation_milli, leaf.amount_wei, proof)  # anyone may claim for a customer
    assert client.balance(payouts[keys[2]]) == leaf.amount_wei
    assert crowd.is_claimed(task_id, 1, keys[2]) and not crowd.is_claimed(task_id, 1, keys[1])
    assert crowd.reputation_of(keys[2]) == pytest.approx(0.7)
    with pytest.raises(ChainError, match="already claimed"):
        crowd.claim(task_id, 1, keys[2], leaf.reputation_milli, leaf.amount_wei, proof)
    assert client.balance(payouts[keys[2]]) == leaf.amount_wei


def test_settlement_gas_does_not_grow_with_customers(crowd: CrowdContracts, make_task: Callable[..., bytes]) -> None:
    gas = {}
    for n in (10, 10_000):
        task_id = make_task(rounds=1, reward_wei=ONE_ETHER)
        plan = settle(_ledger(task_id, 1, {new_key(): (0.7, 10**12) for _ in range(n)}))
        crowd.anchor_round(task_id, 1, new_key(), new_key(), new_key(), n, 0)
        gas[n] = crowd.settle_round(task_id, 1, plan.root, plan.total_wei, len(plan.leaves)).gas_used
    assert gas[10_000] <= gas[10] * 1.05, gas


def test_reclaim_leaves_settled_claims_payable(
    client: ChainClient, crowd: CrowdContracts, make_task: Callable[..., bytes]
) -> None:
    task_id = make_task(rounds=1, reward_wei=ONE_ETHER)
    key = new_key()
    payout = client.new_account().address
    crowd.register(key, Role.DEVICE, payout)
    plan = settle(_ledger(task_id, 1, {key: (0.8, 10**17)}))
    crowd.anchor_round(task_id, 1, new_key(), new_key(), new_key(), 1, 0)
    with pytest.raises(ChainError, match="task running"):  # reclaim before settlement would take what is owed
        crowd.reclaim(task_id)
    crowd.settle_round(task_id, 1, plan.root, plan.total_wei, 1)
    crowd.reclaim(task_id)
    leaf, proof = plan.proof(key.hex())
    crowd.claim(task_id, 1, key, leaf.reputation_milli, leaf.amount_wei, proof)
    assert client.balance(payout) == 10**17
