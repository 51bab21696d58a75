"""Anchoring closed rounds on chain, in order, exactly once.

A round is anchored by one transaction carrying the Merkle root of all its updates, the new global
model's hash and the manifest's hash. The queue is the database (rounds closed but not anchored),
so a chain that is down only delays anchoring. Before sending, the contract is asked whether the
round is already anchored (a crash between the transaction and the database commit): a matching
anchor is adopted, never sent twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from .chain import ChainError
from .contracts import CrowdContracts
from .db import Round

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
    def __init__(self, sessions: sessionmaker, contracts: CrowdContracts) -> None:  # type: ignore[type-arg]
        self.sessions = sessions
        self.contracts = contracts

    def pending(self) -> list[tuple[str, int]]:
        with self.sessions() as s:
            rows = s.execute(
                select(Round.task_id, Round.round).where(Round.status == "closed").order_by(Round.task_id, Round.round)
            ).all()
        return [(t, int(r)) for t, r in rows]

    def anchor_pending(self) -> list[Anchored]:
        done: list[Anchored] = []
        for task_id, round_ in self.pending():
            try:
                done.append(self._anchor(task_id, round_))
            except ChainError as exc:
                with self.sessions.begin() as s:
                    row = s.get(Round, (task_id, round_))
                    if row is not None:
                        row.anchor_attempts += 1
                        row.anchor_error = str(exc)[:500]
                log.warning("anchoring round %d of %s deferred: %s", round_, task_id[:12], exc)
                break  # rounds are anchored in order
        return done

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
            result = Anchored(task_id, round_, existing.tx_hash.hex(), existing.block_number, 0, True)
        else:
            receipt = self.contracts.anchor_round(
                tid, round_, bytes.fromhex(root), bytes.fromhex(model), bytes.fromhex(manifest), accepted, rejected
            )
            result = Anchored(task_id, round_, receipt.tx_hash.hex(), receipt.block_number, receipt.gas_used, False)
        with self.sessions.begin() as s:
            row = s.get(Round, (task_id, round_))
            assert row is not None
            row.status = "anchored"
            row.tx_hash = result.tx_hash
            row.block_number = result.block_number
            row.gas_used = result.gas_used
            row.anchor_error = None
        return result
