"""Update intake: an edge server's signed envelope, checked from the sender to the round's slot,
then stored and recorded (a valid-looking update of the right customer from its edge is kept even
when invalid, so it is anchored and shown as rejected with its reason).

Runs on the HTTP threads; the coordinator's lock serialises it with round closing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from crowdfl.envelope import parse, verify
from crowdfl.errors import CrowdflError, WireError
from crowdfl.identity import PublicIdentity
from crowdfl.messages import CODEC, ModelUpdate, TaskSpec, is_hex64
from crowdfl.receipts import update_receipt_checked

from .chain import ChainError
from .contracts import CrowdContracts
from .db import Round, Update
from .registry import Registry
from .rounds import check_update
from .store import ContentStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntakeResult:
    http_status: int
    status: str  # received | duplicate | rejected
    detail: str = ""
    update_hash: str = ""


class UpdateIntake:
    def __init__(
        self,
        sessions: sessionmaker,  # type: ignore[type-arg]
        store: ContentStore,
        contracts: CrowdContracts,
        registry: Registry,
        spec: Callable[[str], TaskSpec],
        lock: threading.RLock,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.contracts = contracts
        self.registry = registry
        self.spec = spec
        self._lock = lock  # the coordinator's: intake and round closing take turns
        # a round's selection never changes once it is open: parsed once, not per update (at 10,000
        # customers the JSON list is 660 KB, and intake looked it up for every update)
        self._selected: dict[tuple[str, int], frozenset[str]] = {}

    def receive_update(self, envelope: bytes) -> IntakeResult:
        try:
            sealed = parse(envelope)
            edge = self.registry.participant(sealed.sender_id)
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
        known = self.registry.participant(update.customer)
        if known is not None and known.role == "device" and known.active and known.edge == sealed.sender_id:
            try:
                prebound = self.registry.chain_binding(update.customer, sealed.sender_id)
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
            customer = self.registry.participant(update.customer)
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
                bound: str | None = prebound if prebound is not None else self.registry.chain_binding(update.customer, sealed.sender_id)
            except ChainError as exc:
                # liveness over a chain outage: the database binding was checked above, and the
                # audit checks the chain's binding of every anchored update
                log.warning("chain unreachable, device binding of %s checked against the database only: %s", update.customer[:12], exc)
                bound = None
            if bound is not None and bound != sealed.sender_id and not (customer.on_chain and self.registry.edge_on_chain(sealed.sender_id)):
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
