"""Gas budgets on the embedded chain: one anchor per round must beat one transaction per update.

Measured with solc 0.8.37 (london, optimizer 200) on eth-tester: deploy Registry 742,635 and
CrowdTasks 2,433,563 (with device->edge bindings and settleRound/claim); registerMany(10) 284,977; createTask 96,209; anchorRound 124,725;
anchorUpdate ~62,190; setScores(10) 325,877; credit(10) 341,155. Bounds below leave ~10 % room.
"""

from __future__ import annotations

import os
import time

from coordinator.chain import ChainClient
from coordinator.contracts import CrowdContracts, Role


def new_key() -> bytes:
    return os.urandom(32)


def test_gas_budgets(client: ChainClient, crowd: CrowdContracts) -> None:
    assert crowd.deploy_receipts["Registry"].gas_used < 820_000
    assert crowd.deploy_receipts["CrowdTasks"].gas_used < 2_680_000

    edge, devices = new_key(), [new_key() for _ in range(10)]
    reg = crowd.register_many([(k, Role.DEVICE, client.new_account().address) for k in devices])
    assert reg.gas_used < 315_000
    crowd.register(edge, Role.EDGE, None)

    task_id = new_key()
    crowd.create_task(task_id, new_key(), 2, 1.0, int(time.time()) + 600)
    per_update = [crowd.anchor_update(task_id, 1, new_key(), edge, d).gas_used for d in devices]
    assert max(per_update) < 70_000

    small = crowd.anchor_round(task_id, 1, new_key(), new_key(), new_key(), 1, 0).gas_used
    large = crowd.anchor_round(task_id, 2, new_key(), new_key(), new_key(), 100_000, 5_000).gas_used
    assert small < 140_000
    assert abs(large - small) < 200  # independent of how many updates the root covers
    assert small < 3 * min(per_update)  # a round of three or more updates is cheaper anchored once
