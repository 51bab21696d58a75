"""The coordinator's read-only views: what the API and the dashboard show, and the reads the
round engine shares (a task's spec, the current round, a closed round's ledger, reputations).

Nothing here writes to the database, the store or the chain (tests/test_floors.py checks that no
write is spelled in this module); the only state is a cache of task specs, which never change once
published.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from crowdfl.messages import CODEC, RoundManifest, TaskSpec
from crowdfl.task import task_spend_bound

from .db import Participant, Reputation, Round, Task, Update
from .ledger import parse_ledger
from .rounds import leaf_proof
from .settlement import settle, to_milli
from .store import ContentStore


class CoordinatorViews:
    def __init__(self, sessions: sessionmaker, store: ContentStore) -> None:  # type: ignore[type-arg]
        self.sessions = sessions
        self.store = store
        self._specs: dict[str, TaskSpec] = {}

    def spec(self, task_id: str) -> TaskSpec:
        if task_id not in self._specs:
            with self.sessions() as s:
                row = s.get(Task, task_id)
                if row is None:
                    raise KeyError(task_id)
                self._specs[task_id] = CODEC.decode(row.spec, TaskSpec)
        return self._specs[task_id]

    def current_round(self, task_id: str) -> Round | None:
        with self.sessions() as s:
            return s.scalars(select(Round).where(Round.task_id == task_id).order_by(Round.round.desc()).limit(1)).first()

    def round_progress(self, task_id: str, round_: int) -> tuple[int, int]:
        """(updates received, customers selected)."""
        with self.sessions() as s:
            rnd = s.get(Round, (task_id, round_))
            n = int(s.scalar(select(func.count()).select_from(Update).where(Update.task_id == task_id, Update.round == round_)) or 0)
        return n, len(json.loads(rnd.selected)) if rnd else 0

    def running_tasks(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Task.task_id).where(Task.status == "running")))

    def ledger(self, task_id: str, round_: int) -> dict[str, Any] | None:
        """A closed round's ledger, from the store (the same bytes the audit reads)."""
        with self.sessions() as s:
            row = s.get(Round, (task_id, round_))
        if row is None or not row.ledger_hash:
            return None
        return parse_ledger(self.store.get(row.ledger_hash))

    def reputations(self, task_id: str, after_round: int) -> dict[str, float]:
        """Every known customer's reputation in a task after a round (empty before round 1)."""
        ledger = self.ledger(task_id, after_round) if after_round >= 1 else None
        return {c: float(v) for c, v in ledger["reputation_after"].items()} if ledger else {}

    def tasks(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            rows = list(s.scalars(select(Task).order_by(Task.created_at)))
        out = []
        for t in rows:
            spec = self.spec(t.task_id)
            cur = self.current_round(t.task_id)
            out.append({
                "task_id": t.task_id, "spec_hash": t.spec_hash, "status": t.status, "on_chain": t.on_chain,
                "title": spec.title, "rounds": spec.rounds, "epsilon": spec.epsilon, "aggregation": spec.aggregation,
                "deadline": spec.deadline, "reward_wei": t.reward_wei, "created_at": t.created_at,
                "current_round": cur.round if cur else 0, "current_status": cur.status if cur else None,
                "front_model_hash": spec.front_model_hash, "initial_model_hash": spec.initial_model_hash,
            })
        return out

    def rounds(self, task_id: str) -> list[dict[str, Any]]:
        with self.sessions() as s:
            rows = list(s.scalars(select(Round).where(Round.task_id == task_id).order_by(Round.round)))
        return [
            {
                "round": r.round, "status": r.status, "accuracy": r.accuracy, "selected": len(json.loads(r.selected)),
                "accepted": r.accepted, "rejected": r.rejected, "model_hash": r.model_hash,
                "manifest_hash": r.manifest_hash, "merkle_root": r.merkle_root, "tx_hash": r.tx_hash,
                "block_number": r.block_number, "gas_used": r.gas_used, "ledger_hash": r.ledger_hash,
                "opened_at": r.opened_at, "closed_at": r.closed_at, "settled": r.settled,
                "scores_tx": r.scores_tx, "scores_block": r.scores_block, "credit_tx": r.credit_tx,
                "credit_block": r.credit_block, "settle_gas": r.settle_gas,
                "round_gas": (r.gas_used or 0) + (r.settle_gas or 0), "anchor_attempts": r.anchor_attempts, "anchor_error": r.anchor_error,
                "settle_note": r.settle_note,
            }
            for r in rows
        ]

    def round_detail(self, task_id: str, round_: int) -> dict[str, Any] | None:
        """One round for the dashboard: who was selected, every update with its fate and reason."""
        with self.sessions() as s:
            rnd = s.get(Round, (task_id, round_))
            if rnd is None:
                return None
            ups = list(s.scalars(select(Update).where(Update.task_id == task_id, Update.round == round_).order_by(Update.id)))
            reps = {r.customer: r for r in s.scalars(select(Reputation).where(Reputation.task_id == task_id, Reputation.round == round_))}
        summary = next(r for r in self.rounds(task_id) if r["round"] == round_)
        return {
            **summary,
            "base_model_hash": rnd.base_model_hash,
            "selected_customers": json.loads(rnd.selected),
            "eligible": len(json.loads(rnd.eligible)),
            "updates": [
                {
                    "update_hash": u.update_hash, "customer": u.customer, "edge": u.edge, "status": u.status,
                    "reason": u.reason, "num_samples": u.num_samples, "received_at": u.received_at,
                    "score": reps[u.customer].score if u.customer in reps else None,
                    "reputation": reps[u.customer].reputation if u.customer in reps else None,
                    "reward_wei": reps[u.customer].reward_wei if u.customer in reps else "0",
                }
                for u in ups
            ],
        }

    def reputation_history(self, task_id: str) -> dict[str, list[dict[str, Any]]]:
        """customer -> [{round, score, reputation, reward_wei, selected}], rounds ascending."""
        with self.sessions() as s:
            rows = list(s.scalars(select(Reputation).where(Reputation.task_id == task_id).order_by(Reputation.customer, Reputation.round)))
        out: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            out.setdefault(r.customer, []).append(
                {"round": r.round, "score": r.score, "reputation": r.reputation, "reward_wei": r.reward_wei, "selected": r.selected}
            )
        return out

    def customer(self, node_id: str) -> dict[str, Any] | None:
        """What a customer may see about itself: contributions, reputation, rewards, budget used."""
        with self.sessions() as s:
            p = s.get(Participant, node_id)
            if p is None or p.role != "device":
                return None
            ups = list(s.scalars(select(Update).where(Update.customer == node_id).order_by(Update.received_at)))
            reps = list(s.scalars(select(Reputation).where(Reputation.customer == node_id).order_by(Reputation.round)))
        latest_task = ups[-1].task_id if ups else (reps[-1].task_id if reps else None)
        by_round = {(r.task_id, r.round): r for r in reps}
        budget: dict[str, int] = {}
        for u in ups:
            # an edge trains on all of a customer's samples so far, so the largest count is the
            # number of distinct samples released (summing rounds would count each one again)
            budget[u.task_id] = max(budget.get(u.task_id, 0), u.num_samples)
        spent = [_task_budget(self.spec(t), n) for t, n in budget.items()]
        return {
            "customer": node_id, "active": p.active, "edge": p.edge, "payout": p.payout,
            "reputation": next((r.reputation for r in reversed(reps) if r.task_id == latest_task), None),
            "reputation_history": [
                {"task_id": r.task_id, "round": r.round, "reputation": r.reputation, "score": r.score}
                for r in reps if r.task_id == latest_task
            ],
            "rewards_wei": str(sum(int(r.reward_wei) for r in reps)),
            "contributions": [
                {
                    "task_id": u.task_id, "round": u.round, "customer": node_id, "update_hash": u.update_hash,
                    "num_samples": u.num_samples, "status": u.status, "reason": u.reason,
                    "reward_wei": by_round[(u.task_id, u.round)].reward_wei if (u.task_id, u.round) in by_round else "0",
                }
                for u in ups
            ],
            "budget": spent,
            # summed over the tasks: the most their windows (and private labels) can put on one hour /
            # one day of this household's usage; the device's own ledger is authoritative and exact
            "budget_per_hour_bound": sum(b["per_hour_epsilon"] for b in spent),
            "budget_per_day_bound": sum(b["per_day_epsilon"] for b in spent),
        }

    def rewards(self, task_id: str) -> dict[str, Any]:
        """Per round and per customer, in wei as decimal strings (they exceed JSON's safe integers)."""
        with self.sessions() as s:
            task = s.get(Task, task_id)
            if task is None:
                raise KeyError(task_id)
            rows = list(s.scalars(select(Reputation).where(Reputation.task_id == task_id).order_by(Reputation.round)))
            rounds = {r.round: r for r in s.scalars(select(Round).where(Round.task_id == task_id))}
        per_round: dict[int, int] = {}
        customers: dict[str, dict[str, Any]] = {}
        for r in rows:
            wei = int(r.reward_wei)
            per_round[r.round] = per_round.get(r.round, 0) + wei
            c = customers.setdefault(r.customer, {"total_wei": 0, "rounds": {}})
            c["total_wei"] += wei
            if wei:
                c["rounds"][str(r.round)] = str(wei)
        latest = {r.customer: r.reputation for r in rows}  # rows are in round order
        return {
            "task_id": task_id,
            "pool_wei": task.reward_wei,
            "rounds": [
                {"round": k, "paid_wei": str(v), "credit_tx": rounds[k].credit_tx, "credit_block": rounds[k].credit_block}
                for k, v in sorted(per_round.items())
            ],
            "customers": [
                {"customer": k, "reputation": latest[k], "reward_wei": str(v["total_wei"]), "rounds": v["rounds"]}
                for k, v in sorted(customers.items())
            ],
        }

    def participants(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            rows = list(s.scalars(select(Participant).order_by(Participant.role, Participant.node_id)))
        return [
            {
                "node_id": p.node_id, "role": p.role, "enc_key": p.enc_key, "edge": p.edge, "payout": p.payout,
                "active": p.active, "on_chain": p.on_chain, "registered_at": p.registered_at, "removed_at": p.removed_at,
            }
            for p in rows
        ]

    def latest_model(self, task_id: str) -> tuple[int, str] | None:
        """(round, hash) of the task's newest global model: the last closed round's, else the initial one."""
        with self.sessions() as s:
            row = s.scalars(
                select(Round).where(Round.task_id == task_id, Round.model_hash.is_not(None)).order_by(Round.round.desc()).limit(1)
            ).first()
        if row is not None and row.model_hash:
            return row.round, row.model_hash
        try:
            return 0, self.spec(task_id).initial_model_hash
        except KeyError:
            return None

    def claim_proof(self, task_id: str, round_: int, customer: str) -> dict[str, Any] | None:
        """A customer's settlement leaf and proof for ``claim`` (anyone can check it against the chain)."""
        ledger = self.ledger(task_id, round_)
        if ledger is None:
            return None
        try:
            _, proof = settle(ledger).proof(customer)
        except KeyError:
            return None
        with self.sessions() as s:
            row = s.get(Reputation, (task_id, round_, customer))
        if row is None:
            return None
        # the figures are the ones the dashboard shows (the database); the chain's settlement root
        # decides whether they are true (crowdfl-agent verify checks them against it)
        return {
            "task_id": task_id, "round": round_, "customer": customer, "reputation_milli": to_milli(row.reputation),
            "amount_wei": str(row.reward_wei), "proof": [p.hex() for p in proof],
        }

    def leaf_proof(self, task_id: str, round_: int, leaf: str) -> dict[str, Any] | None:
        """Merkle siblings of an update or receipt hash in a closed round's anchored tree."""
        with self.sessions() as s:
            rnd = s.get(Round, (task_id, round_))
        if rnd is None or not rnd.manifest_hash:
            return None
        manifest = CODEC.decode(self.store.get(rnd.manifest_hash), RoundManifest)
        try:
            return {"leaf": leaf, "proof": leaf_proof(manifest, leaf), "merkle_root": rnd.merkle_root}
        except ValueError:
            return None

    def proof(self, task_id: str, round_: int, customer: str) -> dict[str, Any] | None:
        with self.sessions() as s:
            u = s.scalars(select(Update).where(Update.task_id == task_id, Update.round == round_, Update.customer == customer)).first()
            rnd = s.get(Round, (task_id, round_))
        if u is None or rnd is None or u.proof is None:
            return None
        return {"update_hash": u.update_hash, "status": u.status, "reason": u.reason, "proof": json.loads(u.proof), "merkle_root": rnd.merkle_root}


def _task_budget(spec: TaskSpec, samples: int) -> dict[str, Any]:
    """What one task spends of a customer's privacy, per sample and per hour and day of its usage
    (``crowdfl.task.task_spend_bound``: an upper bound, reached if the device released every window)."""
    per_hour, per_day = task_spend_bound(spec)
    return {
        "task_id": spec.task_id, "samples": samples, "epsilon": spec.epsilon, "label_epsilon": spec.label_epsilon,
        "window_hours": spec.window_hours, "window_stride_hours": spec.window_stride_hours,
        "per_hour_epsilon": per_hour, "per_day_epsilon": per_day,
    }
