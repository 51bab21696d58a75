"""Anchoring closed rounds on chain, in order, exactly once; then mirroring their scores and rewards.

A round is anchored by one transaction carrying the Merkle root of all its updates, the new global
model's hash and the manifest's hash; it is then settled by a setScores transaction (the new
reputation of every customer scored in the round) and, when the round pays anything, a credit
transaction (its rewards), both read from the round's ledger. The queue is the database (rounds
closed but not anchored, anchored but not settled), so a chain that is down only delays these.
Before each transaction the chain is asked whether it already happened (a crash between the
transaction and the database commit): a matching record is adopted, never sent twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from crowdfl.errors import CrowdflError

from .chain import ChainError
from .contracts import CrowdContracts, Receipt, Role, RoundEntries
from .db import Round
from .ledger import chain_credits, chain_scores, parse_ledger
from .store import ContentStore

log = logging.getLogger(__name__)

# setScores / credit take one transaction per round (the contract refuses a second); past about
# 1,000 keys that transaction no longer fits a 30M-gas block (setScores measured at ~27k gas a key).
MAX_KEYS_PER_TX = 800


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
        """Mirror the round's scores and rewards on chain (each transaction at most once)."""
        with self.sessions() as s:
            row = s.get(Round, (task_id, round_))
            assert row is not None
            ledger_hash = row.ledger_hash
        tid = bytes.fromhex(task_id)
        notes: list[str] = []
        scores_rec: RoundEntries | None = None
        credit_rec: RoundEntries | None = None
        if ledger_hash:
            ledger = parse_ledger(self.store.get(ledger_hash))
            scores = {bytes.fromhex(c): v for c, v in chain_scores(ledger).items()}
            credits = {bytes.fromhex(c): v for c, v in chain_credits(ledger).items()}
            if scores:
                scores_rec = self.contracts.scores_set(tid).get(round_)
                if scores_rec is None:
                    receipt = self._send(lambda v: self.contracts.set_scores(tid, round_, v), scores, notes, "scores")
                    if receipt is not None:
                        scores_rec = RoundEntries(round_, {}, receipt.tx_hash, receipt.block_number)
            if credits:
                credit_rec = self.contracts.credits(tid).get(round_)
                if credit_rec is None:
                    receipt = self._send(lambda v: self.contracts.credit(tid, round_, v), credits, notes, "rewards")
                    if receipt is not None:
                        credit_rec = RoundEntries(round_, {}, receipt.tx_hash, receipt.block_number)
        with self.sessions.begin() as s:
            row = s.get(Round, (task_id, round_))
            assert row is not None
            row.settled = True
            row.anchor_error = None
            if scores_rec is not None:
                row.scores_tx, row.scores_block = "0x" + scores_rec.tx_hash.hex(), scores_rec.block_number
            if credit_rec is not None:
                row.credit_tx, row.credit_block = "0x" + credit_rec.tx_hash.hex(), credit_rec.block_number
            row.settle_note = "; ".join(notes)[:500] or None

    def _send(
        self, send: Callable[[dict[bytes, Any]], Receipt], values: dict[bytes, Any], notes: list[str], what: str
    ) -> Receipt | None:
        """Send; if the contract refuses, drop the keys it no longer has active (a device removed
        after the round closed makes it refuse the whole batch) and send the rest once."""
        if len(values) > MAX_KEYS_PER_TX:
            # Cannot fit one block and the contract takes one batch per round: say so, and do not
            # hold back the anchoring of later rounds behind a transaction that can never be mined.
            notes.append(f"{what}: {len(values)} customers exceed one transaction ({MAX_KEYS_PER_TX}); not mirrored on chain")
            log.error("round %s not mirrored on chain: %d keys exceed %d per transaction", what, len(values), MAX_KEYS_PER_TX)
            return None
        try:
            return send(values)
        except ChainError as exc:
            if not exc.reverted:
                raise
            kept = {k: v for k, v in values.items() if self.contracts.is_active(k, Role.DEVICE)}
            if len(kept) == len(values):
                raise
        notes.append(f"{what}: {len(values) - len(kept)} removed customer(s) left out")
        return send(kept) if kept else None

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
