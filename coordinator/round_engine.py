"""The round engine: selecting customers, opening a round, closing it (aggregation under the
task's rule or the defences, the ledger, reputations and rewards), advancing a task one transition
per ``step``, and triggering the anchoring of whatever the chain is behind on.

It reads through the views, the registry and the task publisher; the coordinator's lock serialises
its transitions with update intake.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from crowdfl.envelope import parse
from crowdfl.messages import CODEC, ModelUpdate, ModelWeights, RoundStart, TaskSpec
from crowdfl.mqtt import round_topic, task_topic

from .aggregation import AggregationResult
from .anchoring import Anchored, Anchorer
from .db import Participant, Reputation, Round, Task, Update
from .defence import TRUST_MEAN, DefenceConfig
from .ledger import LedgerPolicy, ledger_bytes, round_ledger, round_pool, select_customers, selection_seed
from .publishing import Publisher, TaskPublisher
from .reference import RootData, reference_model
from .registry import Registry
from .reputation import standing
from .rounds import build_round, effective_rule, rule_params
from .store import ContentStore
from .views import CoordinatorViews

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundSummary:
    task_id: str
    round: int
    accuracy: float
    selected: int
    accepted: int
    rejected: int
    model_hash: str
    manifest_hash: str
    merkle_root: str


class RoundEngine:
    def __init__(
        self,
        sessions: sessionmaker,  # type: ignore[type-arg]
        store: ContentStore,
        publish: Publisher,
        views: CoordinatorViews,
        registry: Registry,
        task_publisher: TaskPublisher,
        anchorer: Anchorer,
        lock: threading.RLock,
        evaluate: Callable[[list[np.ndarray]], float] | None,
        byzantine_fraction: float,
        trim_beta: float,
        policy: LedgerPolicy,
        defence: DefenceConfig | None,
        reference_samples: int,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.publish = publish
        self.views = views
        self.registry = registry
        self.task_publisher = task_publisher
        self.anchorer = anchorer
        self._lock = lock  # the coordinator's: closing and intake take turns
        self.evaluate = evaluate
        # held-out evaluation per task (a task's features differ from another's); falls back to evaluate
        self.evaluators: dict[str, Callable[[list[np.ndarray]], float]] = {}
        self.byzantine_fraction = byzantine_fraction
        self.trim_beta = trim_beta
        self.policy = policy
        # Defences (coordinator/defence.py; the default is the configuration chosen on validation
        # homes in bench/quality/robustness.py). A task's rounds are defended when the manufacturer's
        # root dataset for it is in ``roots`` (the CLI builds one for every running task).
        self.defence = defence
        self.roots: dict[str, RootData] = {}
        self.reference_samples = reference_samples

    def select(self, task_id: str, round_: int, eligible: Sequence[str] | None = None) -> list[str]:
        """Customers for a round: drawn by reputation among the active devices, newcomers get slots,
        known customers below the floor are left out (coordinator/ledger.py, coordinator/reputation.py)."""
        pool = self.registry.eligible() if eligible is None else list(eligible)
        return list(select_customers(self.policy, self.views.reputations(task_id, round_ - 1), pool, task_id, round_))

    def open_round(self, task_id: str, round_: int) -> RoundStart:
        spec = self.views.spec(task_id)
        with self._lock, self.sessions.begin() as s:
            row = s.get(Round, (task_id, round_))
            if row is None:
                if round_ == 1:
                    base = spec.initial_model_hash
                else:
                    prev = s.get(Round, (task_id, round_ - 1))
                    if prev is None or prev.model_hash is None:
                        raise ValueError(f"round {round_ - 1} is not closed")
                    base = prev.model_hash
                eligible = self.registry.eligible()
                selected = self.select(task_id, round_, eligible)
                row = Round(
                    task_id=task_id, round=round_, status="open", base_model_hash=base, selected=json.dumps(selected),
                    eligible=json.dumps(eligible), opened_at=time.time(),
                )
                s.add(row)
            rs = RoundStart(task_id, round_, row.base_model_hash, tuple(json.loads(row.selected)), spec.deadline)
        self.publish(round_topic(task_id), self.task_publisher.sign(CODEC.encode(rs)), True)
        return rs

    def step(self, task_id: str, round_timeout_s: float, now: float | None = None) -> RoundSummary | None:
        """Advance a task by at most one transition; returns the summary of a round it closed.

        A round closes when every selected customer's update arrived, or when ``round_timeout_s``
        has passed with at least one (stragglers do not hold the crowd back; their data is used
        in their next round). Anchoring runs after every close and is retried on every call.
        """
        now = time.time() if now is None else now
        spec = self.views.spec(task_id)
        rnd = self.views.current_round(task_id)
        closed: RoundSummary | None = None
        if rnd is None:
            self.open_round(task_id, 1)
        elif rnd.status == "open":
            got, want = self.views.round_progress(task_id, rnd.round)
            with self.sessions() as s:
                valid = s.scalars(
                    select(Update.id).where(Update.task_id == task_id, Update.round == rnd.round, Update.status == "received").limit(1)
                ).first()
            # a round needs one valid update for a model; until then it waits for more (or the timeout)
            if valid is not None and (got >= want or now - rnd.opened_at > round_timeout_s):
                closed = self.close_round(task_id, rnd.round)
                if rnd.round < spec.rounds:
                    self.open_round(task_id, rnd.round + 1)
                else:
                    self._finish(task_id)
        elif rnd.round < spec.rounds:
            self.open_round(task_id, rnd.round + 1)
        else:
            self._finish(task_id)  # the last round closed before a crash could mark the task done
        self.anchor_pending()
        return closed

    def close_round(self, task_id: str, round_: int) -> RoundSummary:
        spec = self.views.spec(task_id)
        with self._lock:
            with self.sessions() as s:
                rnd = s.get(Round, (task_id, round_))
                if rnd is None:
                    raise ValueError(f"round {round_} does not exist")
                if rnd.status != "open":
                    return self._summary(rnd)
                ups = list(s.scalars(select(Update).where(Update.task_id == task_id, Update.round == round_)))
            decoded = {u.update_hash: CODEC.decode(parse(self.store.get(u.update_hash)).body, ModelUpdate) for u in ups}
            candidates = [(u.update_hash, decoded[u.update_hash]) for u in ups if u.status == "received"]
            receipts = []
            for mu in decoded.values():
                if mu.receipt:
                    receipts.append(self.store.put(mu.receipt))  # the device's receipt, a leaf of the round

            invalid = [(u.update_hash, u.reason or "invalid") for u in ups if u.status == "rejected"]
            root = self.roots.get(task_id)
            if self.defence is not None and root is not None:
                rule, params = self._defended_params(spec, task_id, round_, rnd.base_model_hash, candidates, root, self.defence)
            else:
                rule = effective_rule(spec.aggregation, len(candidates))
                params = rule_params(rule, len(candidates), self.byzantine_fraction, self.trim_beta)
            with self.sessions() as s:
                task = s.get(Task, task_id)
                assert task is not None
                payees = set(s.scalars(select(Participant.node_id).where(Participant.role == "device", Participant.payout.is_not(None))))
            pool = round_pool(int(task.reward_wei), spec.rounds, round_)
            ledgers: list[dict[str, Any]] = []

            def make_ledger(ordered: Sequence[tuple[str, ModelUpdate]], result: AggregationResult) -> str:
                ledger = round_ledger(
                    self.policy, task_id, round_, json.loads(rnd.eligible), json.loads(rnd.selected),
                    self.views.reputations(task_id, round_ - 1), ordered, result,
                    [(u.customer, u.reason or "invalid") for u in ups if u.status == "rejected"], pool, payees,
                )
                ledgers.append(ledger)
                return self.store.put(ledger_bytes(ledger))

            built = build_round(
                spec, round_, rnd.base_model_hash, candidates, invalid, rule, params, self.evaluators.get(task_id, self.evaluate),
                ledger=make_ledger, receipts=receipts, resolve=self.store.get,
            )
            ledger = ledgers[0]
            model_hash = self.store.put(built.model_bytes)
            manifest_hash = self.store.put(built.manifest_bytes)
            kept = set(built.kept)
            reasons = dict(r.split(":", 1) for r in built.manifest.rejected)
            with self.sessions.begin() as s:
                rnd = s.get(Round, (task_id, round_))
                assert rnd is not None
                for u in s.scalars(select(Update).where(Update.task_id == task_id, Update.round == round_)):
                    if u.status == "received":
                        u.status = "accepted" if u.update_hash in kept else "rejected"
                        if u.update_hash not in kept:
                            u.reason = reasons.get(u.update_hash, f"excluded_by_{built.manifest.rule}")
                    u.proof = json.dumps(built.proofs[u.update_hash])
                rnd.status = "closed"
                rnd.closed_at = time.time()
                rnd.model_hash = model_hash
                rnd.manifest_hash = manifest_hash
                rnd.merkle_root = built.manifest.merkle_root
                rnd.accuracy = built.manifest.held_out_accuracy
                rnd.accepted = len(built.manifest.accepted)
                rnd.rejected = len(built.manifest.rejected)
                rnd.ledger_hash = built.manifest.ledger_hash
                chosen = set(ledger["selected"])
                for customer, reputation in ledger["reputation_after"].items():
                    s.merge(Reputation(
                        task_id=task_id, round=round_, customer=customer, score=ledger["scores"].get(customer),
                        reputation=reputation, reward_wei=ledger["rewards"].get(customer, "0"), selected=customer in chosen,
                    ))
                summary = self._summary(rnd)
        return summary

    def _defended_params(
        self, spec: TaskSpec, task_id: str, round_: int, base_hash: str, candidates: Sequence[tuple[str, ModelUpdate]],
        root: RootData, defence: DefenceConfig,
    ) -> tuple[str, dict[str, Any]]:
        """The inputs of a defended round: the server's reference update (stored, so the audit can
        re-run the defences), each update's standing from its reputation, the inner rule's params."""
        by_hash = dict(candidates)
        customers = [by_hash[h].customer for h in sorted(by_hash)]
        stand = standing(self.views.reputations(task_id, round_ - 1), customers, self.policy.trust)
        base = [np.asarray(w, np.float32) for w in CODEC.decode(self.store.get(base_hash), ModelWeights).weights]
        seed = selection_seed(task_id, round_) % 2**31
        ref = reference_model(base, root, spec, seed, samples=min(len(root.labels), self.reference_samples))
        ref_hash = self.store.put(CODEC.encode(ModelWeights(task_id, round_, tuple(ref))))
        inner = {} if defence.rule == TRUST_MEAN else rule_params(defence.rule, len(candidates), self.byzantine_fraction, self.trim_beta)
        return defence.rule, {"defence": defence.to_json(), "reference": ref_hash, "standing": stand, "inner": inner}

    @staticmethod
    def _summary(rnd: Round) -> RoundSummary:
        return RoundSummary(
            rnd.task_id, rnd.round, float(rnd.accuracy if rnd.accuracy is not None else float("nan")),
            len(json.loads(rnd.selected)), rnd.accepted, rnd.rejected,
            rnd.model_hash or "", rnd.manifest_hash or "", rnd.merkle_root or "",
        )

    def _finish(self, task_id: str) -> None:
        with self.sessions.begin() as s:
            row = s.get(Task, task_id)
            if row is not None:
                row.status = "done"

    def anchor_pending(self) -> list[Anchored]:
        """Everything the chain is behind on: registry, tasks, then rounds (anchor, scores, rewards)."""
        with self._lock:
            self.registry.sync_registry()
            self.task_publisher.sync_tasks()
            return self.anchorer.anchor_pending()

    def republish(self) -> None:
        """After a restart: put every running task's spec and current round back on MQTT."""
        for task_id in self.views.running_tasks():
            with self.sessions() as s:
                row = s.get(Task, task_id)
                assert row is not None
                spec_bytes = row.spec
            self.publish(task_topic(task_id), self.task_publisher.sign(spec_bytes), True)
            rnd = self.views.current_round(task_id)
            if rnd is not None and rnd.status == "open":
                self.open_round(task_id, rnd.round)
