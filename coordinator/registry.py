"""The participants' registry: devices and edge servers in the database (the source of truth at
once) and on chain (brought in line by ``sync_registry``, retried after a chain outage)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker
from web3 import Web3

from crowdfl.identity import PublicIdentity
from crowdfl.messages import is_hex64

from .chain import ChainError
from .contracts import CrowdContracts, Role
from .db import Participant

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, sessions: sessionmaker, contracts: CrowdContracts, lock: threading.RLock) -> None:  # type: ignore[type-arg]
        self.sessions = sessions
        self.contracts = contracts
        self._lock = lock  # the coordinator's: a removal is serialised with update intake
        # devices enrolled per registerMany / bindEdges transaction (about 26k and 28k gas an entry;
        # the PoA chain's block gas limit is 30M)
        self.registry_batch = 50
        # device -> edge bindings this process has read from the chain. Only this coordinator's key
        # can change the Registry (onlyOwner), and it forgets them whenever it registers or removes
        # anyone, so a binding read once holds for later updates; at 10,000 updates a round the
        # eth_call per update cost the chain node more CPU than the edges' training (bench/scale.py)
        self._bound_on_chain: dict[str, str] = {}

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

    def eligible(self) -> list[str]:
        with self.sessions() as s:
            return sorted(s.scalars(select(Participant.node_id).where(Participant.role == "device", Participant.active)))

    def participant(self, node_id: str) -> Participant | None:
        with self.sessions() as s:
            return s.get(Participant, node_id)

    def edge_on_chain(self, node_id: str) -> bool:
        row = self.participant(node_id)
        return row is not None and row.on_chain

    def chain_binding(self, device: str, edge: str) -> str:
        """The edge the chain binds ``device`` to (hex, empty when none); a binding to ``edge`` is kept."""
        bound = self._bound_on_chain.get(device)
        if bound != edge:
            bound = (self.contracts.edge_of(bytes.fromhex(device)) or b"").hex()
            if bound == edge:
                self._bound_on_chain[device] = bound
        return bound
