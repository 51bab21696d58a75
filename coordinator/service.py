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
from sqlalchemy import func, select
from web3 import Web3
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from crowdfl.backmodel import accuracy
from crowdfl.envelope import parse, seal, verify
from crowdfl.errors import CrowdflError, WireError
from crowdfl.identity import Identity, PublicIdentity
from crowdfl.messages import CODEC, ModelUpdate, ModelWeights, RoundManifest, RoundStart, TaskSpec, is_hex64
from crowdfl.mqtt import round_topic, task_topic
from crowdfl.receipts import update_receipt_checked

from .aggregation import AggregationResult, AggregationRule
from .defence import TRUST_MEAN, DefenceConfig
from .reference import RootData, reference_model
from .reputation import standing
from .anchoring import Anchored, Anchorer
from .chain import ChainError
from .contracts import CrowdContracts, Role
from .db import Participant, Reputation, Round, Task, Update
from .ledger import LedgerPolicy, ledger_bytes, parse_ledger, round_ledger, round_pool, select_customers, selection_seed
from .rounds import build_round, check_update, effective_rule, leaf_proof, rule_params
from .settlement import settle, to_milli
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
        self._specs: dict[str, TaskSpec] = {}
        # a round's selection never changes once it is open: parsed once, not per update (at 10,000
        # customers the JSON list is 660 KB, and intake looked it up for every update)
        self._selected: dict[tuple[str, int], frozenset[str]] = {}
        # devices enrolled per registerMany / bindEdges transaction (about 26k and 28k gas an entry;
        # the PoA chain's block gas limit is 30M)
        self.registry_batch = 50
        # device -> edge bindings this process has read from the chain. Only this coordinator's key
        # can change the Registry (onlyOwner), and it forgets them whenever it registers or removes
        # anyone, so a binding read once holds for later updates; at 10,000 updates a round the
        # eth_call per update cost the chain node more CPU than the edges' training (bench/scale.py)
        self._bound_on_chain: dict[str, str] = {}

    # -- registry -------------------------------------------------------------------------------
    def register(self, entries: Sequence[tuple[PublicIdentity, str, str | None, str | None]]) -> None:
        """(identity, role "device"|"edge", a device's edge node id, payout address) -> DB and chain.

        The database is the source of truth at once; the chain follows (queued when it is down)."""
        for pub, role, edge, payout in entries:
            if role not in ("device", "edge"):
                raise ValueError(f"role must be device or edge, got {role!r}")
            if payout is not None and not Web3.is_address(payout):
                raise ValueError(f"payout must be an Ethereum address, got {payout!r}")
            if edge is not None and not is_hex64(edge):
                raise ValueError("edge must be an edge server's node id (64 lowercase hex characters)")
        with self.sessions.begin() as s:
            for pub, role, edge, payout in entries:
                row = s.get(Participant, pub.node_id)
                if row is None:
                    s.add(Participant(
                        node_id=pub.node_id, role=role, enc_key=pub.enc_key.hex(), edge=edge, payout=payout,
                        active=True, on_chain=False, registered_at=time.time(),
                    ))
                elif row.role != role:
                    raise ValueError(f"{pub.node_id[:16]} is already registered as {row.role}")
                elif row.active and (row.enc_key != pub.enc_key.hex() or (payout is not None and payout != row.payout)):
                    # never a silent no-op: a new key or payout of an active participant is a
                    # rotation, done explicitly (remove, then register again with the new values)
                    what = "encryption key" if row.enc_key != pub.enc_key.hex() else "payout address"
                    raise ValueError(
                        f"{pub.node_id[:16]} is registered with another {what}; to rotate it, remove the participant, then register it again"
                    )
                else:
                    if not row.active or row.edge != edge:
                        row.on_chain = False  # the chain still has it removed, or bound to another edge
                    if not row.active:
                        row.enc_key = pub.enc_key.hex()  # re-registration after removal: the rotation
                        if payout is not None:
                            row.payout = payout
                    row.active, row.edge, row.removed_at = True, edge, None
        self.sync_registry()

    def remove(self, node_id: str) -> bool:
        """Deactivate a participant: its later updates are refused at once; the chain follows."""
        with self._lock, self.sessions.begin() as s:
            row = s.get(Participant, node_id)
            if row is None or not row.active:
                return False
            row.active, row.on_chain, row.removed_at = False, False, time.time()
        self.sync_registry()
        return True

    def sync_registry(self) -> int:
        """Bring the chain's registry in line with the database (retried after a chain outage).

        A registration or removal may have reached the chain before a crash kept the database from
        recording it, so a refused batch is checked against the chain before it is sent again."""
        with self.sessions() as s:
            todo = list(s.scalars(select(Participant).where(Participant.on_chain.is_(False))))
        if not todo:
            return 0
        self._bound_on_chain.clear()  # the chain's bindings are about to change
        role = {p.node_id: Role.EDGE if p.role == "edge" else Role.DEVICE for p in todo}
        adds = [p for p in todo if p.active]
        drops = [p for p in todo if not p.active]
        done: list[tuple[str, bool]] = []
        try:
            step = max(1, self.registry_batch)
            for i in range(0, len(adds), step):
                batch = adds[i : i + step]
                entries = [(bytes.fromhex(p.node_id), role[p.node_id], p.payout) for p in batch]
                try:
                    self.contracts.register_many(entries)
                except ChainError as exc:
                    if not exc.reverted:
                        raise
                    missing = [e for e in entries if not self.contracts.is_active(e[0], e[1])]
                    if missing:
                        self.contracts.register_many(missing)
                done += [(p.node_id, True) for p in batch]
            # device -> edge bindings, once both ends are on chain (the coordinator refuses an
            # update whose device is not bound to the submitting edge on chain)
            edges_on_chain = {p.node_id for p in adds if p.role == "edge"}
            with self.sessions() as s:
                edges_on_chain |= set(s.scalars(select(Participant.node_id).where(Participant.role == "edge", Participant.active, Participant.on_chain)))
            pairs = [(bytes.fromhex(p.node_id), bytes.fromhex(p.edge)) for p in adds if p.role == "device" and p.edge in edges_on_chain]
            for i in range(0, len(pairs), step):
                self.contracts.bind_edges(pairs[i : i + step])
                # the receipt says the chain now binds exactly these pairs
                self._bound_on_chain.update((d.hex(), e.hex()) for d, e in pairs[i : i + step])
            for p in drops:
                key = bytes.fromhex(p.node_id)
                if self.contracts.is_active(key, role[p.node_id]):
                    self.contracts.remove(key)
                done.append((p.node_id, False))
        except ChainError as exc:
            log.warning("registry sync deferred: %s", exc)
        with self.sessions.begin() as s:
            for node_id, active in done:
                row = s.get(Participant, node_id)
                if row is not None and row.active == active:  # not flipped again meanwhile
                    row.on_chain = True
        return len(done)

    def _edge_on_chain(self, node_id: str) -> bool:
        row = self._participant(node_id)
        return row is not None and row.on_chain

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
        """Store the task's artifacts, record it, create it on chain (queued if the chain is down)
        and publish it, retained, on MQTT. ``reward_wei`` is paid into the task's pool on chain."""
        if isinstance(reward_wei, bool) or not isinstance(reward_wei, int) or not 0 <= reward_wei < 2**256:
            raise ValueError(f"reward_wei must be an integer in [0, 2**256), got {reward_wei!r}")
        if spec.rounds < 1:
            raise ValueError("a task needs at least one round")
        if spec.deadline <= time.time():
            raise ValueError("the task's deadline has passed")
        AggregationRule(spec.aggregation)  # ValueError naming the rules when unknown
        spec_bytes = CODEC.encode(spec)
        spec_hash = self.store.put(spec_bytes)
        if self.store.put(front_tflite) != spec.front_model_hash:
            raise ValueError("front model bytes do not match the spec's hash")
        if self.store.put(CODEC.encode(initial)) != spec.initial_model_hash:
            raise ValueError("initial model does not match the spec's hash")
        with self.sessions.begin() as s:
            row = s.get(Task, spec.task_id)
            if row is None:
                s.add(Task(task_id=spec.task_id, spec_hash=spec_hash, spec=spec_bytes, created_at=time.time(), reward_wei=str(reward_wei)))
            elif row.spec_hash != spec_hash:
                raise ValueError(f"task {spec.task_id[:16]} already exists with another spec")
        self.sync_tasks()
        self.publish(task_topic(spec.task_id), self._sign(spec_bytes), True)
        return spec_hash

    def sync_tasks(self) -> int:
        """Create on chain the tasks that are not there yet (a crash or an outage deferred them)."""
        with self.sessions() as s:
            todo = list(s.scalars(select(Task).where(Task.on_chain.is_(False))))
        done = 0
        for t in todo:
            tid = bytes.fromhex(t.task_id)
            spec = self.spec(t.task_id)
            try:
                if not self.contracts.task_exists(tid):
                    self.contracts.create_task(tid, bytes.fromhex(t.spec_hash), spec.rounds, spec.epsilon, spec.deadline, int(t.reward_wei))
            except ChainError as exc:
                log.warning("creating task %s on chain deferred: %s", t.task_id[:12], exc)
                return done
            with self.sessions.begin() as s:
                row = s.get(Task, t.task_id)
                assert row is not None
                row.on_chain = True
            done += 1
        return done

    def eligible(self) -> list[str]:
        with self.sessions() as s:
            return sorted(s.scalars(select(Participant.node_id).where(Participant.role == "device", Participant.active)))

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

    def _selected_in(self, task_id: str, round_: int) -> frozenset[str]:
        """The customers selected for an open round (read from the database once per round)."""
        key = (task_id, round_)
        if key not in self._selected:
            with self.sessions() as s:
                raw = s.scalar(select(Round.selected).where(Round.task_id == task_id, Round.round == round_))
            if raw is None:
                return frozenset()
            self._selected = {k: v for k, v in self._selected.items() if k[0] != task_id}  # keep one round per task
            self._selected[key] = frozenset(json.loads(raw))
        return self._selected[key]

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
            verify(sealed, PublicIdentity.from_hex(edge.node_id, edge.enc_key))
            if sealed.encrypted:
                raise WireError("malformed", "updates are signed, not encrypted")
            update = CODEC.decode(sealed.body, ModelUpdate)
        except CrowdflError as exc:
            log.warning("refused update submission: %s", exc)
            return IntakeResult(400 if exc.code != "bad_signature" else 403, "rejected", str(exc))
        update_hash = sealed.digest
        if not is_hex64(update.customer) or not 1 <= update.round <= 2**31 - 1 or not 0 <= update.num_samples <= 2**31 - 1:
            return IntakeResult(400, "rejected", "malformed: customer must be 64 hex characters, round and num_samples 32-bit")
        # the chain's binding of a device this edge serves, read before the lock: an eth_call (once
        # per device, then kept) must not hold every other edge's submission up
        prebound: str | ChainError | None = None
        known = self._participant(update.customer)
        if known is not None and known.role == "device" and known.active and known.edge == sealed.sender_id:
            try:
                prebound = self._chain_binding(update.customer, sealed.sender_id)
            except ChainError as exc:
                prebound = exc
        with self._lock:
            try:
                spec = self.spec(update.task_id)
            except KeyError:
                return IntakeResult(404, "rejected", "unknown_task")
            with self.sessions() as s:
                # only the columns intake needs: the row's selected and eligible lists are 1.3 MB at
                # 10,000 customers, and this runs once per update
                rnd = s.execute(
                    select(Round.round, Round.status, Round.base_model_hash).where(
                        Round.task_id == update.task_id, Round.round == update.round
                    )
                ).first()
            if rnd is None or rnd.status != "open":
                return IntakeResult(409, "rejected", f"round_closed: round {update.round} is not open")
            # who may fill this customer's slot is decided before the slot is looked at: only the
            # customer's own edge, for a selected, active device. Anything else is refused without
            # storing it, so no edge can take another edge's customer's place or close a round early.
            customer = self._participant(update.customer)
            refusal: tuple[int, str] | None = None
            if customer is not None and customer.role == "device" and not customer.active:
                refusal = (422, "removed_customer: the manufacturer removed this device")
            elif customer is None or customer.role != "device":
                refusal = (422, "unknown_customer")
            elif customer.edge != sealed.sender_id:
                refusal = (403, "wrong_edge: the customer is not served by this edge")
            elif update.customer not in self._selected_in(update.task_id, update.round):
                refusal = (422, "not_selected")
            if refusal is not None:
                log.warning("update from %s for %s refused: %s", sealed.sender_id[:12], update.customer[:12], refusal[1])
                return IntakeResult(refusal[0], "rejected", refusal[1], update_hash)
            with self.sessions() as s:
                prior = s.scalars(
                    select(Update).where(Update.task_id == update.task_id, Update.round == update.round, Update.customer == update.customer)
                ).first()
            if prior is not None:
                if prior.update_hash == update_hash:
                    return IntakeResult(200, "duplicate", "", update_hash)
                return IntakeResult(409, "rejected", "conflict: another update for this customer and round was received first")
            # the device's own signed receipt must vouch for the update's sample count and inputs,
            # and the chain must bind the device to the submitting edge
            try:
                update_receipt_checked(update, sealed.sender_id, spec)
            except WireError as exc:
                log.warning("update from %s for %s refused: %s", sealed.sender_id[:12], update.customer[:12], exc)
                return IntakeResult(422, "rejected", str(exc), update_hash)
            try:
                if isinstance(prebound, ChainError):
                    raise prebound
                bound: str | None = prebound if prebound is not None else self._chain_binding(update.customer, sealed.sender_id)
            except ChainError as exc:
                # liveness over a chain outage: the database binding was checked above, and the
                # audit checks the chain's binding of every anchored update
                log.warning("chain unreachable, device binding of %s checked against the database only: %s", update.customer[:12], exc)
                bound = None
            if bound is not None and bound != sealed.sender_id and not (customer.on_chain and self._edge_on_chain(sealed.sender_id)):
                return IntakeResult(503, "rejected", "registry_sync_pending: the device's registration is not on chain yet")
            if bound is not None and bound != sealed.sender_id:
                log.warning("update from %s for %s refused: device not bound to this edge on chain", sealed.sender_id[:12], update.customer[:12])
                return IntakeResult(403, "rejected", "wrong_edge_on_chain: the chain does not bind this device to this edge", update_hash)
            # from here on the update is the customer's, from its edge: an invalid one is kept,
            # anchored and shown as rejected with its reason (and scores 0 for reputation)
            reason = ""
            try:
                check_update(update, spec, rnd.round, rnd.base_model_hash)
            except WireError as exc:
                reason = str(exc)
            self.store.put(envelope)
            try:
                with self.sessions.begin() as s:
                    s.add(Update(
                        task_id=update.task_id, round=update.round, customer=update.customer, edge=sealed.sender_id,
                        update_hash=update_hash, status="rejected" if reason else "received", reason=reason[:200] or None,
                        num_samples=update.num_samples, received_at=time.time(),
                    ))
            except IntegrityError:
                return IntakeResult(200, "duplicate", "", update_hash)
        if reason:
            log.warning("update from %s for %s rejected: %s", sealed.sender_id[:12], update.customer[:12], reason)
            return IntakeResult(422, "rejected", reason, update_hash)
        return IntakeResult(200, "received", "", update_hash)

    def _chain_binding(self, device: str, edge: str) -> str:
        """The edge the chain binds ``device`` to (hex, empty when none); a binding to ``edge`` is kept."""
        bound = self._bound_on_chain.get(device)
        if bound != edge:
            bound = (self.contracts.edge_of(bytes.fromhex(device)) or b"").hex()
            if bound == edge:
                self._bound_on_chain[device] = bound
        return bound

    def round_progress(self, task_id: str, round_: int) -> tuple[int, int]:
        """(updates received, customers selected)."""
        with self.sessions() as s:
            rnd = s.get(Round, (task_id, round_))
            n = int(s.scalar(select(func.count()).select_from(Update).where(Update.task_id == task_id, Update.round == round_)) or 0)
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
            "budget": [{"task_id": t, "samples": n, "epsilon": self.spec(t).epsilon} for t, n in budget.items()],
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

    def proof(self, task_id: str, round_: int, customer: str) -> dict[str, Any] | None:
        with self.sessions() as s:
            u = s.scalars(select(Update).where(Update.task_id == task_id, Update.round == round_, Update.customer == customer)).first()
            rnd = s.get(Round, (task_id, round_))
        if u is None or rnd is None or u.proof is None:
            return None
        return {"update_hash": u.update_hash, "status": u.status, "reason": u.reason, "proof": json.loads(u.proof), "merkle_root": rnd.merkle_root}
