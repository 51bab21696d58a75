"""A round's settlement: one Merkle root over (customer, reputation, reward) leaves, claimed by proof.

The coordinator sends one constant-size transaction per round (``settleRound``: root, total,
count), whatever the number of customers; each customer, or anyone on its behalf, later claims its
leaf with a Merkle proof (``claim``), and the contract pays the customer's registered payout once.
The leaves follow from the round's ledger alone (which the manifest anchors), so the audit rebuilds
the root and compares it with the chain.

leaf = sha256(task_id(32) || round(uint32 BE) || customer(32) || reputation x 1000 (uint32 BE) || wei(uint256 BE)),
exactly ``abi.encodePacked`` in CrowdTasks.settlementLeaf. Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from crowdfl.merkle import merkle_proof, merkle_root

# the root of a round that pays and scores nobody (the contract needs a non-zero root)
EMPTY_ROOT = hashlib.sha256(b"crowdfl-empty-settlement").digest()


@dataclass(frozen=True)
class SettlementLeaf:
    customer: str  # node id (hex)
    reputation_milli: int
    amount_wei: int


@dataclass(frozen=True)
class RoundSettlement:
    task_id: str
    round: int
    leaves: tuple[SettlementLeaf, ...]
    root: bytes
    total_wei: int

    def proof(self, customer: str) -> tuple[SettlementLeaf, list[bytes]]:
        hashed = [leaf_hash(self.task_id, self.round, x) for x in self.leaves]
        for i, leaf in enumerate(self.leaves):
            if leaf.customer == customer:
                return leaf, merkle_proof(hashed, i)
        raise KeyError(customer)


def to_milli(value: float) -> int:
    return int(round(float(value) * 1000))


def leaf_hash(task_id: str, round_: int, leaf: SettlementLeaf) -> bytes:
    return hashlib.sha256(
        bytes.fromhex(task_id)
        + round_.to_bytes(4, "big")
        + bytes.fromhex(leaf.customer)
        + leaf.reputation_milli.to_bytes(4, "big")
        + leaf.amount_wei.to_bytes(32, "big")
    ).digest()


def settle(ledger: Mapping[str, Any]) -> RoundSettlement:
    """The settlement a round's ledger implies: every customer scored or paid in the round."""
    task_id, round_ = str(ledger["task_id"]), int(ledger["round"])
    rewards = {c: int(v) for c, v in ledger["rewards"].items()}
    customers = sorted(set(ledger["scores"]) | {c for c, v in rewards.items() if v > 0})
    leaves = tuple(
        SettlementLeaf(c, to_milli(ledger["reputation_after"].get(c, 0.0)), rewards.get(c, 0)) for c in customers
    )
    root = merkle_root([leaf_hash(task_id, round_, x) for x in leaves]) if leaves else EMPTY_ROOT
    return RoundSettlement(task_id, round_, leaves, root, sum(x.amount_wei for x in leaves))
