"""Anchoring closed rounds on chain, in order, exactly once; then mirroring their scores and rewards.

A round is anchored by one transaction carrying the Merkle root of all its updates and receipts, the
new global model's hash and the manifest's hash; it is then settled by one settleRound transaction
(the root over the round's (customer, reputation, reward) leaves, read from the round's ledger),
whose gas does not grow with the number of customers. A task's next round is anchored only after
the previous one is settled (the queue is processed in order and stops at the first failure). The queue is the database (rounds
closed but not anchored, anchored but not settled), so a chain that is down only delays these.
Before each transaction the chain is asked whether it already happened (a crash between the
transaction and the database commit): a matching record is adopted, never sent twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from crowdfl.errors import CrowdflError

from .chain import ChainError
from .contracts import CrowdContracts
from .db import Round
from .ledger import parse_ledger
from .settlement import EMPTY_ROOT, RoundSettlement, settle
from .store import ContentStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Anchored:
    task_id: str
    round: int
    tx_hash: str
    block_number: int
    gas_used: int
    adopted: bool  # found already on chain (after a crash) rather than sent now


class Anchorer:
    def __init__(self, sessions: sessionmaker, contracts: CrowdContracts, store: ContentStore) -> None:  # type: ignore[type-arg]
        self.sessions = sessions
        self.contracts = contracts
        self.store = store

    def pending(self) -> list[tuple[str, int, str]]:
        """(task, round, status) of every round closed but not anchored, or anchored but not settled."""
        with self.sessions() as s:
            rows = s.execute(
                select(Round.task_id, Round.round, Round.status)
                .where((Round.status == "closed") | ((Round.status == "anchored") & Round.settled.is_(False)))
                .order_by(Round.task_id, Round.round)
            ).all()
        return [(t, int(r), str(st)) for t, r, st in rows]

    def anchor_pending(self) -> list[Anchored]:
        done: list[Anchored] = []
        blocked: set[str] = set()
        for task_id, round_, status in self.pending():
            if task_id in blocked:
                continue
            try:
                if status == "closed":
                    done.append(self._anchor(task_id, round_))
                self._settle(task_id, round_)
            except (ChainError, CrowdflError, ValueError) as exc:  # ledger unreadable: an operator must look
                if not isinstance(exc, ChainError):
                    log.error("round %d of %s cannot be settled: %s", round_, task_id[:12], exc)
                with self.sessions.begin() as s:
                    row = s.get(Round, (task_id, round_))
                    if row is not None:
                        row.anchor_attempts += 1
                        row.anchor_error = str(exc)[:500]
                log.warning("anchoring round %d of %s deferred: %s", round_, task_id[:12], exc)
                blocked.add(task_id)  # a task's rounds are anchored in order
        return done

    def _settle(self, task_id: str, round_: int) -> None:
        """Settle the anchored round on chain: one root over its (customer, reputation, reward) leaves.

        Constant gas per round whatever the number of customers; customers claim with a proof
        (coordinator/settlement.py). Sent once: a settlement already on chain (a crash between the
        transaction and the database commit) is adopted if it is the same, an error if it is not."""
        with self.sessions() as s:
            row = s.get(Round, (task_id, round_))
            assert row is not None
            ledger_hash = row.ledger_hash
        tid = bytes.fromhex(task_id)
        if ledger_hash:
            plan = settle(parse_ledger(self.store.get(ledger_hash)))
        else:
            plan = RoundSettlement(task_id, round_, (), EMPTY_ROOT, 0)
        existing = self.contracts.settlement(tid, round_)
        gas = 0
        if existing is not None:
            if existing.root != plan.root or existing.total_wei != plan.total_wei:
                raise ChainError(f"round {round_} is settled on chain with another root: refusing to continue")
            tx, block = self.contracts.settled_rounds(tid).get(round_, (b"", 0))
        else:
            receipt = self.contracts.settle_round(tid, round_, plan.root, plan.total_wei, len(plan.leaves))
            tx, block, gas = receipt.tx_hash, receipt.block_number, receipt.gas_used
        with self.sessions.begin() as s:
            row = s.get(Round, (task_id, round_))
            assert row is not None
            row.settled = True
            row.anchor_error = None
            row.credit_tx, row.credit_block = "0x" + bytes(tx).hex(), block
            row.settle_gas = gas
            row.settle_note = None

    def _anchor(self, task_id: str, round_: int) -> Anchored:
        with self.sessions() as s:
            row = s.get(Round, (task_id, round_))
            assert row is not None and row.merkle_root and row.model_hash and row.manifest_hash
            root, model, manifest = row.merkle_root, row.model_hash, row.manifest_hash
            accepted, rejected = row.accepted, row.rejected
        tid = bytes.fromhex(task_id)
        existing = {a.round: a for a in self.contracts.anchors(tid)}.get(round_)
        if existing is not None:
            if existing.merkle_root.hex() != root or existing.model_hash.hex() != model:
                raise ChainError(f"round {round_} is anchored on chain with different hashes: refusing to continue")
            result = Anchored(task_id, round_, "0x" + existing.tx_hash.hex(), existing.block_number, 0, True)
        else:
            receipt = self.contracts.anchor_round(
                tid, round_, bytes.fromhex(root), bytes.fromhex(model), bytes.fromhex(manifest), accepted, rejected
            )
            result = Anchored(task_id, round_, "0x" + receipt.tx_hash.hex(), receipt.block_number, receipt.gas_used, False)
        with self.sessions.begin() as s:
            row = s.get(Round, (task_id, round_))
            assert row is not None
            row.status = "anchored"
            row.tx_hash = result.tx_hash
            row.block_number = result.block_number
            row.gas_used = result.gas_used
            row.anchor_error = None
        return result
