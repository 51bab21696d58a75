"""The coordinator, assembled from its parts; ``Coordinator`` is a thin facade over them, so the
CLI, the API, the demo and the tests call one object:

- ``views.py``         read-only views for the API and the dashboard, and the reads the parts share
- ``registry.py``      devices and edge servers, in the database and on chain
- ``publishing.py``    tasks: artifacts, database row, chain, the signed spec on MQTT
- ``intake.py``        an edge's signed update, checked and recorded (HTTP threads)
- ``round_engine.py``  selection, opening, closing, ``step`` and the anchoring trigger
- ``claims.py``        claims sent on a customer's behalf (the coordinator pays the gas)

Update intake (HTTP thread) and round control (the caller's thread) share the database; one lock,
made here and handed to the parts, serialises the transitions of one coordinator process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sqlalchemy.orm import sessionmaker

from crowdfl.backmodel import accuracy
from crowdfl.identity import Identity, PublicIdentity
from crowdfl.messages import ModelWeights, RoundStart, TaskSpec

from .anchoring import Anchored, Anchorer
from .claims import ClaimLimits, ClaimSender
from .contracts import CrowdContracts
from .db import Round
from .defence import DefenceConfig
from .intake import IntakeResult, UpdateIntake
from .ledger import LedgerPolicy
from .publishing import Publisher, TaskPublisher
from .registry import Registry
from .round_engine import RoundEngine, RoundSummary
from .store import ContentStore
from .views import CoordinatorViews

__all__ = ["Coordinator", "HeldOut", "IntakeResult", "Publisher", "RoundSummary"]


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
        claim_limits: ClaimLimits | None = None,
    ) -> None:
        self.identity = identity
        self.sessions = sessions
        self.store = store
        self.contracts = contracts
        self.publish = publish
        self._lock = threading.RLock()  # one coordinator process: intake, closing and removal take turns
        self.anchorer = Anchorer(sessions, contracts, store)
        self.views = CoordinatorViews(sessions, store)
        self.registry = Registry(sessions, contracts, self._lock)
        self.task_publisher = TaskPublisher(identity, sessions, store, contracts, publish, self.views.spec)
        self.intake = UpdateIntake(sessions, store, contracts, self.registry, self.views.spec, self._lock)
        self.engine = RoundEngine(
            sessions, store, publish, self.views, self.registry, self.task_publisher, self.anchorer, self._lock,
            evaluate, byzantine_fraction, trim_beta, policy or LedgerPolicy(), defence, reference_samples,
        )
        self.claims = ClaimSender(contracts, self.views.claim_proof, claim_limits)
        # the engine's per-task inputs, filled by the CLI and the demo (the same dicts, not copies)
        self.evaluators = self.engine.evaluators
        self.roots = self.engine.roots

    @property
    def policy(self) -> LedgerPolicy:
        return self.engine.policy

    @property
    def defence(self) -> DefenceConfig | None:
        return self.engine.defence

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

    # -- update intake (coordinator/intake.py) --------------------------------------------------
    def receive_update(self, envelope: bytes) -> IntakeResult:
        return self.intake.receive_update(envelope)

    # -- the round engine and the anchoring trigger (coordinator/round_engine.py) ---------------
    def select(self, task_id: str, round_: int, eligible: Sequence[str] | None = None) -> list[str]:
        return self.engine.select(task_id, round_, eligible)

    def open_round(self, task_id: str, round_: int) -> RoundStart:
        return self.engine.open_round(task_id, round_)

    def close_round(self, task_id: str, round_: int) -> RoundSummary:
        return self.engine.close_round(task_id, round_)

    def step(self, task_id: str, round_timeout_s: float, now: float | None = None) -> RoundSummary | None:
        return self.engine.step(task_id, round_timeout_s, now)

    def anchor_pending(self) -> list[Anchored]:
        return self.engine.anchor_pending()

    def republish(self) -> None:
        self.engine.republish()

    # -- claims (coordinator/claims.py) ---------------------------------------------------------
    def submit_claim(self, task_id: str, round_: int, customer: str) -> dict[str, Any]:
        return self.claims.submit_claim(task_id, round_, customer)
