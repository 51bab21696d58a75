"""The coordinator, assembled: registry, tasks, rounds, update intake, closing and anchoring.

Update intake (HTTP thread) and round control (the caller's thread) share the database; a lock
serialises the transitions of one coordinator process.
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

from crowdfl.backmodel import accuracy
from crowdfl.envelope import parse
from crowdfl.identity import Identity, PublicIdentity
from crowdfl.messages import CODEC, ModelUpdate, ModelWeights, RoundStart, TaskSpec
from crowdfl.mqtt import round_topic, task_topic

from .aggregation import AggregationResult
from .defence import TRUST_MEAN, DefenceConfig
from .reference import RootData, reference_model
from .reputation import standing
from .anchoring import Anchored, Anchorer
from .contracts import CrowdContracts
from .db import Participant, Reputation, Round, Task, Update
from .ledger import LedgerPolicy, ledger_bytes, round_ledger, round_pool, select_customers, selection_seed
from .rounds import build_round, effective_rule, rule_params
from .intake import IntakeResult, UpdateIntake
from .publishing import Publisher, TaskPublisher
from .registry import Registry
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


class HeldOut:
    """The manufacturer's held-out evaluation data (clean features of its own test homes)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        self.features = features
        self.labels = labels

    def __call__(self, weights: list[np.ndarray]) -> float:
        return accuracy(weights, self.features, self.labels)


class Coordinator:
    def __init__(
        self,
        identity: Identity,
        sessions: sessionmaker,  # type: ignore[type-arg]
        store: ContentStore,
        contracts: CrowdContracts,
        publish: Publisher,
        evaluate: Callable[[list[np.ndarray]], float] | None = None,
        byzantine_fraction: float = 0.2,
        trim_beta: float = 0.1,
        policy: LedgerPolicy | None = None,
        defence: DefenceConfig | None = DefenceConfig(),  # noqa: B008 (frozen)
        reference_samples: int = 1024,
    ) -> None:
        self.identity = identity
        self.sessions = sessions
        self.store = store
        self.contracts = contracts
        self.publish = publish
        self.evaluate = evaluate
        # held-out evaluation per task (a task's features differ from another's); falls back to evaluate
        self.evaluators: dict[str, Callable[[list[np.ndarray]], float]] = {}
        self.byzantine_fraction = byzantine_fraction
        self.trim_beta = trim_beta
        self.policy = policy or LedgerPolicy()
        # Defences (coordinator/defence.py; the default is the configuration chosen on validation
        # homes in bench/quality/robustness.py). A task's rounds are defended when the manufacturer's
        # root dataset for it is in ``roots`` (the CLI builds one for every running task).
        self.defence = defence
        self.roots: dict[str, RootData] = {}
        self.reference_samples = reference_samples
        self.anchorer = Anchorer(sessions, contracts, store)
        self._lock = threading.RLock()
        self.views = CoordinatorViews(sessions, store)
        self.registry = Registry(sessions, contracts, self._lock)
        self.task_publisher = TaskPublisher(identity, sessions, store, contracts, publish, self.views.spec)
        self.intake = UpdateIntake(sessions, store, contracts, self.registry, self.views.spec, self._lock)

    # -- registry (coordinator/registry.py) -----------------------------------------------------
    def register(self, entries: Sequence[tuple[PublicIdentity, str, str | None, str | None]]) -> None:
        self.registry.register(entries)

    def remove(self, node_id: str) -> bool:
        return self.registry.remove(node_id)

    def sync_registry(self) -> int:
        return self.registry.sync_registry()

    def eligible(self) -> list[str]:
        return self.registry.eligible()

    # -- task publishing (coordinator/publishing.py) --------------------------------------------
    def publish_task(self, spec: TaskSpec, front_tflite: bytes, initial: ModelWeights, reward_wei: int = 0) -> str:
        return self.task_publisher.publish_task(spec, front_tflite, initial, reward_wei)

    def sync_tasks(self) -> int:
        return self.task_publisher.sync_tasks()

    def _sign(self, body: bytes) -> bytes:
        return self.task_publisher.sign(body)

    # -- read-only views (coordinator/views.py) -------------------------------------------------
    def spec(self, task_id: str) -> TaskSpec:
        return self.views.spec(task_id)

    def current_round(self, task_id: str) -> Round | None:
        return self.views.current_round(task_id)

    def round_progress(self, task_id: str, round_: int) -> tuple[int, int]:
        return self.views.round_progress(task_id, round_)

    def running_tasks(self) -> list[str]:
        return self.views.running_tasks()

    def ledger(self, task_id: str, round_: int) -> dict[str, Any] | None:
        return self.views.ledger(task_id, round_)

    def reputations(self, task_id: str, after_round: int) -> dict[str, float]:
        return self.views.reputations(task_id, after_round)

    def tasks(self) -> list[dict[str, Any]]:
        return self.views.tasks()

    def rounds(self, task_id: str) -> list[dict[str, Any]]:
        return self.views.rounds(task_id)

    def round_detail(self, task_id: str, round_: int) -> dict[str, Any] | None:
        return self.views.round_detail(task_id, round_)

    def reputation_history(self, task_id: str) -> dict[str, list[dict[str, Any]]]:
        return self.views.reputation_history(task_id)

    def customer(self, node_id: str) -> dict[str, Any] | None:
        return self.views.customer(node_id)

    def rewards(self, task_id: str) -> dict[str, Any]:
        return self.views.rewards(task_id)

    def participants(self) -> list[dict[str, Any]]:
        return self.views.participants()

    def latest_model(self, task_id: str) -> tuple[int, str] | None:
        return self.views.latest_model(task_id)

    def claim_proof(self, task_id: str, round_: int, customer: str) -> dict[str, Any] | None:
        return self.views.claim_proof(task_id, round_, customer)

    def leaf_proof(self, task_id: str, round_: int, leaf: str) -> dict[str, Any] | None:
        return self.views.leaf_proof(task_id, round_, leaf)

    def proof(self, task_id: str, round_: int, customer: str) -> dict[str, Any] | None:
        return self.views.proof(task_id, round_, customer)

    # -- tasks and rounds -----------------------------------------------------------------------
    def select(self, task_id: str, round_: int, eligible: Sequence[str] | None = None) -> list[str]:
        """Customers for a round: drawn by reputation among the active devices, newcomers get slots,
        known customers below the floor are left out (coordinator/ledger.py, coordinator/reputation.py)."""
        pool = self.eligible() if eligible is None else list(eligible)
        return list(select_customers(self.policy, self.reputations(task_id, round_ - 1), pool, task_id, round_))

    def open_round(self, task_id: str, round_: int) -> RoundStart:
        spec = self.spec(task_id)
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
                eligible = self.eligible()
                selected = self.select(task_id, round_, eligible)
                row = Round(
                    task_id=task_id, round=round_, status="open", base_model_hash=base, selected=json.dumps(selected),
                    eligible=json.dumps(eligible), opened_at=time.time(),
                )
                s.add(row)
            rs = RoundStart(task_id, round_, row.base_model_hash, tuple(json.loads(row.selected)), spec.deadline)
        self.publish(round_topic(task_id), self._sign(CODEC.encode(rs)), True)
        return rs

    # -- update intake (coordinator/intake.py) --------------------------------------------------
    def receive_update(self, envelope: bytes) -> IntakeResult:
        return self.intake.receive_update(envelope)

    # -- closing --------------------------------------------------------------------------------
    def close_round(self, task_id: str, round_: int) -> RoundSummary:
        spec = self.spec(task_id)
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
                    self.reputations(task_id, round_ - 1), ordered, result,
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
        stand = standing(self.reputations(task_id, round_ - 1), customers, self.policy.trust)
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

    def anchor_pending(self) -> list[Anchored]:
        """Everything the chain is behind on: registry, tasks, then rounds (anchor, scores, rewards)."""
        with self._lock:
            self.sync_registry()
            self.sync_tasks()
            return self.anchorer.anchor_pending()

    def step(self, task_id: str, round_timeout_s: float, now: float | None = None) -> RoundSummary | None:
        """Advance a task by at most one transition; returns the summary of a round it closed.

        A round closes when every selected customer's update arrived, or when ``round_timeout_s``
        has passed with at least one (stragglers do not hold the crowd back; their data is used
        in their next round). Anchoring runs after every close and is retried on every call.
        """
        now = time.time() if now is None else now
        spec = self.spec(task_id)
        rnd = self.current_round(task_id)
        closed: RoundSummary | None = None
        if rnd is None:
            self.open_round(task_id, 1)
        elif rnd.status == "open":
            got, want = self.round_progress(task_id, rnd.round)
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

    def _finish(self, task_id: str) -> None:
        with self.sessions.begin() as s:
            row = s.get(Task, task_id)
            if row is not None:
                row.status = "done"

    def republish(self) -> None:
        """After a restart: put every running task's spec and current round back on MQTT."""
        for task_id in self.running_tasks():
            with self.sessions() as s:
                row = s.get(Task, task_id)
                assert row is not None
                spec_bytes = row.spec
            self.publish(task_topic(task_id), self._sign(spec_bytes), True)
            rnd = self.current_round(task_id)
            if rnd is not None and rnd.status == "open":
                self.open_round(task_id, rnd.round)

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

