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
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from crowdfl.backmodel import accuracy
from crowdfl.envelope import parse, seal, verify
from crowdfl.errors import CrowdflError, WireError
from crowdfl.identity import Identity, PublicIdentity
from crowdfl.messages import CODEC, ModelUpdate, ModelWeights, RoundStart, TaskSpec, sha256_hex
from crowdfl.mqtt import round_topic, task_topic

from .anchoring import Anchored, Anchorer
from .chain import ChainError
from .contracts import CrowdContracts, Role
from .db import Participant, Round, Task, Update
from .rounds import build_round, check_update, rule_params
from .store import ContentStore

log = logging.getLogger(__name__)

Publisher = Callable[[str, bytes, bool], None]  # (topic, payload, retain)


@dataclass(frozen=True)
class IntakeResult:
    http_status: int
    status: str  # received | duplicate | rejected
    detail: str = ""
    update_hash: str = ""


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
    ) -> None:
        self.identity = identity
        self.sessions = sessions
        self.store = store
        self.contracts = contracts
        self.publish = publish
        self.evaluate = evaluate
        self.byzantine_fraction = byzantine_fraction
        self.trim_beta = trim_beta
        self.anchorer = Anchorer(sessions, contracts)
        self._lock = threading.RLock()
        self._specs: dict[str, TaskSpec] = {}

    # -- registry -------------------------------------------------------------------------------
    def register(self, entries: Sequence[tuple[PublicIdentity, str, str | None, str | None]]) -> None:
        """(identity, role "device"|"edge", a device's edge node id, payout address) -> DB and chain."""
        with self.sessions.begin() as s:
            for pub, role, edge, payout in entries:
                if role not in ("device", "edge"):
                    raise ValueError(f"role must be device or edge, got {role!r}")
                row = s.get(Participant, pub.node_id)
                if row is None:
                    s.add(Participant(node_id=pub.node_id, role=role, enc_key=pub.enc_key.hex(), edge=edge, payout=payout, active=True, on_chain=False))
                else:
                    row.active, row.edge = True, edge
        self.sync_registry()

    def sync_registry(self) -> int:
        """Register on chain whoever is not yet (retried after a chain outage)."""
        with self.sessions() as s:
            todo = list(s.scalars(select(Participant).where(Participant.on_chain.is_(False), Participant.active)))
        if not todo:
            return 0
        entries = [(bytes.fromhex(p.node_id), Role.EDGE if p.role == "edge" else Role.DEVICE, p.payout) for p in todo]
        try:
            for i in range(0, len(entries), 50):
                self.contracts.register_many(entries[i : i + 50])
        except ChainError as exc:
            log.warning("registry sync deferred: %s", exc)
            return 0
        with self.sessions.begin() as s:
            for p in todo:
                row = s.get(Participant, p.node_id)
                if row is not None:
                    row.on_chain = True
        return len(todo)

    def _participant(self, node_id: str) -> Participant | None:
        with self.sessions() as s:
            return s.get(Participant, node_id)

    # -- tasks and rounds -----------------------------------------------------------------------
    def spec(self, task_id: str) -> TaskSpec:
        if task_id not in self._specs:
            with self.sessions() as s:
                row = s.get(Task, task_id)
                if row is None:
                    raise KeyError(task_id)
                self._specs[task_id] = CODEC.decode(row.spec, TaskSpec)
        return self._specs[task_id]

    def _sign(self, body: bytes) -> bytes:
        return seal(body, self.identity, time.time_ns())

    def publish_task(self, spec: TaskSpec, front_tflite: bytes, initial: ModelWeights, reward_wei: int = 0) -> str:
        spec_bytes = CODEC.encode(spec)
        spec_hash = self.store.put(spec_bytes)
        if self.store.put(front_tflite) != spec.front_model_hash:
            raise ValueError("front model bytes do not match the spec's hash")
        if self.store.put(CODEC.encode(initial)) != spec.initial_model_hash:
            raise ValueError("initial model does not match the spec's hash")
        with self.sessions.begin() as s:
            if s.get(Task, spec.task_id) is None:
                s.add(Task(task_id=spec.task_id, spec_hash=spec_hash, spec=spec_bytes, created_at=time.time()))
        self.contracts.create_task(
            bytes.fromhex(spec.task_id), bytes.fromhex(spec_hash), spec.rounds, spec.epsilon, spec.deadline, reward_wei
        )
        with self.sessions.begin() as s:
            row = s.get(Task, spec.task_id)
            assert row is not None
            row.on_chain = True
        self.publish(task_topic(spec.task_id), self._sign(spec_bytes), True)
        return spec_hash

    def select(self, task_id: str, round_: int) -> list[str]:
        """Customers for a round: every active registered device (reputation selection: issue 5)."""
        with self.sessions() as s:
            return sorted(s.scalars(select(Participant.node_id).where(Participant.role == "device", Participant.active)))

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
                selected = self.select(task_id, round_)
                row = Round(task_id=task_id, round=round_, status="open", base_model_hash=base, selected=json.dumps(selected), opened_at=time.time())
                s.add(row)
            rs = RoundStart(task_id, round_, row.base_model_hash, tuple(json.loads(row.selected)), spec.deadline)
        self.publish(round_topic(task_id), self._sign(CODEC.encode(rs)), True)
        return rs

    def current_round(self, task_id: str) -> Round | None:
        with self.sessions() as s:
            return s.scalars(select(Round).where(Round.task_id == task_id).order_by(Round.round.desc()).limit(1)).first()

    # -- update intake --------------------------------------------------------------------------
    def receive_update(self, envelope: bytes) -> IntakeResult:
        try:
            sealed = parse(envelope)
            edge = self._participant(sealed.sender_id)
            if edge is None or edge.role != "edge" or not edge.active:
                return IntakeResult(403, "rejected", "unknown_sender: not a registered edge server")
            verify(sealed, PublicIdentity(bytes.fromhex(edge.node_id), bytes.fromhex(edge.enc_key)))
            if sealed.encrypted:
                raise WireError("malformed", "updates are signed, not encrypted")
            update = CODEC.decode(sealed.body, ModelUpdate)
        except CrowdflError as exc:
            log.warning("refused update submission: %s", exc)
            return IntakeResult(400 if exc.code != "bad_signature" else 403, "rejected", str(exc))
        update_hash = sealed.digest
        with self._lock:
            try:
                spec = self.spec(update.task_id)
            except KeyError:
                return IntakeResult(404, "rejected", "unknown_task")
            with self.sessions() as s:
                rnd = s.get(Round, (update.task_id, update.round))
                prior = s.scalars(
                    select(Update).where(Update.task_id == update.task_id, Update.round == update.round, Update.customer == update.customer)
                ).first()
            if prior is not None:
                if prior.update_hash == update_hash:
                    return IntakeResult(200, "duplicate", "", update_hash)
                return IntakeResult(409, "rejected", "conflict: another update for this customer and round was received first")
            if rnd is None or rnd.status != "open":
                return IntakeResult(409, "rejected", f"round_closed: round {update.round} is not open")
            customer = self._participant(update.customer)
            reason = ""
            if customer is None or customer.role != "device" or not customer.active:
                reason = "unknown_customer"
            elif customer.edge != sealed.sender_id:
                reason = "wrong_edge: the customer is not served by this edge"
            elif update.customer not in json.loads(rnd.selected):
                reason = "not_selected"
            else:
                try:
                    check_update(update, spec, rnd.round, rnd.base_model_hash)
                except WireError as exc:
                    reason = str(exc)
            self.store.put(envelope)
            try:
                with self.sessions.begin() as s:
                    s.add(Update(
                        task_id=update.task_id, round=update.round, customer=update.customer, edge=sealed.sender_id,
                        update_hash=update_hash, status="rejected" if reason else "received", reason=reason or None,
                        num_samples=update.num_samples, received_at=time.time(),
                    ))
            except IntegrityError:
                return IntakeResult(200, "duplicate", "", update_hash)
        if reason:
            log.warning("update from %s for %s rejected: %s", sealed.sender_id[:12], update.customer[:12], reason)
            return IntakeResult(422, "rejected", reason, update_hash)
        return IntakeResult(200, "received", "", update_hash)

    def round_progress(self, task_id: str, round_: int) -> tuple[int, int]:
        """(updates received, customers selected)."""
        with self.sessions() as s:
            rnd = s.get(Round, (task_id, round_))
            n = len(list(s.scalars(select(Update.id).where(Update.task_id == task_id, Update.round == round_))))
        return n, len(json.loads(rnd.selected)) if rnd else 0

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
            candidates = [(u.update_hash, CODEC.decode(parse(self.store.get(u.update_hash)).body, ModelUpdate)) for u in ups if u.status == "received"]
            invalid = [(u.update_hash, u.reason or "invalid") for u in ups if u.status == "rejected"]
            params = rule_params(spec.aggregation, len(candidates), self.byzantine_fraction, self.trim_beta)
            built = build_round(spec, round_, rnd.base_model_hash, candidates, invalid, spec.aggregation, params, self.evaluate)
            model_hash = self.store.put(built.model_bytes)
            manifest_hash = self.store.put(built.manifest_bytes)
            kept = set(built.kept)
            with self.sessions.begin() as s:
                rnd = s.get(Round, (task_id, round_))
                assert rnd is not None
                for u in s.scalars(select(Update).where(Update.task_id == task_id, Update.round == round_)):
                    if u.status == "received":
                        u.status = "accepted" if u.update_hash in kept else "rejected"
                        if u.update_hash not in kept:
                            u.reason = f"excluded_by_{built.manifest.rule}"
                    u.proof = json.dumps(built.proofs[u.update_hash])
                rnd.status = "closed"
                rnd.closed_at = time.time()
                rnd.model_hash = model_hash
                rnd.manifest_hash = manifest_hash
                rnd.merkle_root = built.manifest.merkle_root
                rnd.accuracy = built.manifest.held_out_accuracy
                rnd.accepted = len(built.manifest.accepted)
                rnd.rejected = len(built.manifest.rejected)
                summary = self._summary(rnd)
        return summary

    @staticmethod
    def _summary(rnd: Round) -> RoundSummary:
        return RoundSummary(
            rnd.task_id, rnd.round, float(rnd.accuracy if rnd.accuracy is not None else float("nan")),
            len(json.loads(rnd.selected)), rnd.accepted, rnd.rejected,
            rnd.model_hash or "", rnd.manifest_hash or "", rnd.merkle_root or "",
        )

    def anchor_pending(self) -> list[Anchored]:
        with self._lock:
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
            if got >= want or (got > 0 and now - rnd.opened_at > round_timeout_s):
                closed = self.close_round(task_id, rnd.round)
                if rnd.round < spec.rounds:
                    self.open_round(task_id, rnd.round + 1)
                else:
                    self._finish(task_id)
        elif rnd.round < spec.rounds:
            self.open_round(task_id, rnd.round + 1)
        self.anchor_pending()
        return closed

    def _finish(self, task_id: str) -> None:
        with self.sessions.begin() as s:
            row = s.get(Task, task_id)
            if row is not None:
                row.status = "done"

    def running_tasks(self) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Task.task_id).where(Task.status == "running")))

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

    def rounds(self, task_id: str) -> list[dict[str, Any]]:
        with self.sessions() as s:
            rows = list(s.scalars(select(Round).where(Round.task_id == task_id).order_by(Round.round)))
        return [
            {
                "round": r.round, "status": r.status, "accuracy": r.accuracy, "selected": len(json.loads(r.selected)),
                "accepted": r.accepted, "rejected": r.rejected, "model_hash": r.model_hash,
                "manifest_hash": r.manifest_hash, "merkle_root": r.merkle_root, "tx_hash": r.tx_hash,
                "block_number": r.block_number, "gas_used": r.gas_used,
            }
            for r in rows
        ]

    def tasks(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            rows = list(s.scalars(select(Task).order_by(Task.created_at)))
        return [{"task_id": t.task_id, "spec_hash": t.spec_hash, "status": t.status, "on_chain": t.on_chain} for t in rows]

    def proof(self, task_id: str, round_: int, customer: str) -> dict[str, Any] | None:
        with self.sessions() as s:
            u = s.scalars(select(Update).where(Update.task_id == task_id, Update.round == round_, Update.customer == customer)).first()
            rnd = s.get(Round, (task_id, round_))
        if u is None or rnd is None or u.proof is None:
            return None
        return {"update_hash": u.update_hash, "status": u.status, "reason": u.reason, "proof": json.loads(u.proof), "merkle_root": rnd.merkle_root}
