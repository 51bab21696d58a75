"""Claims sent on a customer's behalf: the coordinator signs the transaction and pays its gas, the
contract pays the customer's registered payout (only a true settlement leaf, only once)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .contracts import CrowdContracts


class ClaimSender:
    def __init__(self, contracts: CrowdContracts, claim_proof: Callable[[str, int, str], dict[str, Any] | None]) -> None:
        self.contracts = contracts
        self.claim_proof = claim_proof  # the views': the leaf and proof the database settled

    def submit_claim(self, task_id: str, round_: int, customer: str) -> dict[str, Any]:
        """Send a customer's claim on its behalf (the contract pays the customer's registered payout)."""
        tid, key = bytes.fromhex(task_id), bytes.fromhex(customer)
        if self.contracts.is_claimed(tid, round_, key):
            return {"status": "already_claimed"}
        leaf = self.claim_proof(task_id, round_, customer)
        if leaf is None:
            raise KeyError(customer)
        receipt = self.contracts.claim(
            tid, round_, key, leaf["reputation_milli"], int(leaf["amount_wei"]), [bytes.fromhex(p) for p in leaf["proof"]]
        )
        return {"status": "claimed", "tx_hash": "0x" + receipt.tx_hash.hex(), "amount_wei": leaf["amount_wei"]}
