"""Task publishing: a task's artifacts into the store, its row into the database, the task on chain
(``sync_tasks``, retried after an outage) and its signed spec, retained, on MQTT."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from crowdfl.envelope import seal
from crowdfl.identity import Identity
from crowdfl.messages import CODEC, ModelWeights, TaskSpec
from crowdfl.mqtt import task_topic

from .aggregation import AggregationRule
from .chain import ChainError
from .contracts import CrowdContracts
from .db import Task
from .store import ContentStore

log = logging.getLogger(__name__)

Publisher = Callable[[str, bytes, bool], None]  # (topic, payload, retain)


class TaskPublisher:
    def __init__(
        self,
        identity: Identity,
        sessions: sessionmaker,  # type: ignore[type-arg]
        store: ContentStore,
        contracts: CrowdContracts,
        publish: Publisher,
        spec: Callable[[str], TaskSpec],
    ) -> None:
        self.identity = identity
        self.sessions = sessions
        self.store = store
        self.contracts = contracts
        self.publish = publish
        self.spec = spec

    def sign(self, body: bytes) -> bytes:
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
        self.publish(task_topic(spec.task_id), self.sign(spec_bytes), True)
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
