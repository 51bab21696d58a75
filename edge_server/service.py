"""The edge server, assembled: an ingest thread and a training worker, decoupled by a queue.

ingest (MQTT drain -> verify/decrypt/validate -> persist -> ack) never waits for training;
the worker trains a customer's dense layers when that customer's batch for the current round
has been persisted, signs the update and submits it; unsent updates are retried.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from crowdfl.envelope import open_envelope, seal
from crowdfl.errors import CrowdflError
from crowdfl.identity import Identity, PublicIdentity, short_id
from crowdfl.messages import CODEC, Ack, ModelUpdate, ModelWeights, RoundStart, TaskSpec
from crowdfl.mqtt import PREFIX, Incoming, MqttLink, ack_topic

from .ingest import Ingestor
from .store import EdgeStore
from .submit import CoordinatorClient
from .trainer import train_customer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    task_id: str
    round: int
    customer: str


@dataclass
class EdgeStats:
    trained: int = 0
    submitted: int = 0
    submit_rejected: int = 0
    train_seconds: float = 0.0


class EdgeServer:
    def __init__(
        self,
        identity: Identity,
        coordinator: PublicIdentity,
        store: EdgeStore,
        link: MqttLink,
        submitter: CoordinatorClient,
        fetch_artifact: Callable[[str], bytes],
        seed: int = 0,
        drain_max: int = 500,
        drain_wait_s: float = 0.05,
        resubmit_every_s: float = 5.0,
    ) -> None:
        self.identity = identity
        self.coordinator = coordinator
        self.store = store
        self.link = link
        self.submitter = submitter
        self.fetch_artifact = fetch_artifact
        self.seed = seed
        self.drain_max = drain_max
        self.drain_wait_s = drain_wait_s
        self.resubmit_every_s = resubmit_every_s
        self.tasks: dict[str, TaskSpec] = {}
        self.rounds: dict[str, RoundStart] = {}
        self.ingestor = Ingestor(identity, store, self.tasks.get)
        self.jobs: queue.Queue[TrainJob] = queue.Queue()
        self.stats = EdgeStats()
        self._models: dict[str, list[np.ndarray]] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    @staticmethod
    def subscriptions(short: str) -> list[str]:
        return [f"{PREFIX}/tasks/+", f"{PREFIX}/tasks/+/round", f"{PREFIX}/feat/{short}/+"]

    # -- ingest side ---------------------------------------------------------------------------
    def drain_once(self) -> int:
        msgs: list[Incoming] = []
        try:
            msgs.append(self.link.inbox.get(timeout=self.drain_wait_s))
            while len(msgs) < self.drain_max:
                msgs.append(self.link.inbox.get_nowait())
        except queue.Empty:
            pass
        if not msgs:
            return 0
        features = [m for m in msgs if m.topic.startswith(f"{PREFIX}/feat/")]
        for m in msgs:
            if not m.topic.startswith(f"{PREFIX}/feat/"):
                self._control(m)
        if features:
            drained = self.ingestor.drain(features)
            for device, seqs in drained.acks.items():
                ack = Ack(device, np.array(sorted(set(seqs)), dtype=np.uint64))
                self.link.publish(ack_topic(short_id(self.identity.node_id), short_id(device)), seal(CODEC.encode(ack), self.identity, time.time_ns()), qos=1)
            for b in drained.accepted:
                self._maybe_schedule(b.task_id, b.round, b.device)
        return len(msgs)

    def _control(self, m: Incoming) -> None:
        try:
            opened = open_envelope(m.payload, lookup_sender=lambda s: self.coordinator if s == self.coordinator.node_id else None)
            if m.topic.endswith("/round"):
                rs = CODEC.decode(opened.body, RoundStart)
                prev = self.rounds.get(rs.task_id)
                if prev is None or rs.round > prev.round:
                    self.rounds[rs.task_id] = rs
                    for device in self.store.rounds_received(rs.task_id, rs.round):
                        self._maybe_schedule(rs.task_id, rs.round, device)
            else:
                spec = CODEC.decode(opened.body, TaskSpec)
                self.tasks.setdefault(spec.task_id, spec)
        except CrowdflError as exc:
            log.warning("rejected control message on %s: %s", m.topic, exc)

    def _maybe_schedule(self, task_id: str, round_: int, device: str) -> None:
        rs = self.rounds.get(task_id)
        if rs is None or rs.round != round_ or device not in rs.selected:
            return  # the data stays stored and is used in the device's next selected round
        self.jobs.put(TrainJob(task_id, round_, device))

    # -- training side -------------------------------------------------------------------------
    def _global_weights(self, model_hash: str) -> list[np.ndarray]:
        if model_hash not in self._models:
            mw = CODEC.decode(self.fetch_artifact(model_hash), ModelWeights)
            self._models[model_hash] = [np.asarray(w) for w in mw.weights]
        return self._models[model_hash]

    def train_job(self, job: TrainJob) -> None:
        if self.store.has_update(job.task_id, job.round, job.customer):
            return
        spec = self.tasks[job.task_id]
        rs = self.rounds[job.task_id]
        data = self.store.customer_data(job.customer, job.task_id, spec.feature_dim)
        seed = (self.seed * 1_000_003 + job.round * 7919 + int(job.customer[:8], 16)) % 2**31
        result = train_customer(self._global_weights(rs.global_model_hash), data, spec, seed)
        update = ModelUpdate(
            job.task_id, job.round, job.customer, rs.global_model_hash, tuple(result.weights),
            result.num_samples, result.inputs_digest, result.loss,
        )
        env = seal(CODEC.encode(update), self.identity, time.time_ns())
        self.store.save_update(job.task_id, job.round, job.customer, env, hashlib.sha256(env).hexdigest(), result.seconds)
        self.stats.trained += 1
        self.stats.train_seconds += result.seconds
        log.info("trained %s round %d on %d samples in %.2fs (loss %.3f)", job.customer[:12], job.round, result.num_samples, result.seconds, result.loss)

    def submit_pending(self) -> None:
        for update_id, env in self.store.unsubmitted_updates():
            res = self.submitter.submit(env)
            if res.final:
                self.store.mark_submitted(update_id)
                if res.status == "rejected":
                    self.stats.submit_rejected += 1
                    log.warning("coordinator rejected update %d: %s", update_id, res.detail)
                else:
                    self.stats.submitted += 1
            else:
                log.info("coordinator unreachable (%s); update %d stays queued", res.detail, update_id)
                break

    def _worker(self) -> None:
        last_resubmit = 0.0
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                job = None
            if job is not None:
                try:
                    self.train_job(job)
                except Exception:  # a failed job must not kill the worker
                    log.exception("training %s round %d failed", job.customer[:12], job.round)
                self.submit_pending()
            elif time.monotonic() - last_resubmit > self.resubmit_every_s:
                last_resubmit = time.monotonic()
                self.submit_pending()

    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.drain_once()
            except Exception:
                log.exception("ingest drain failed; continuing")
                time.sleep(0.5)

    def start(self) -> None:
        self.ingestor.refresh_devices()
        self.link.start()
        for target, name in ((self._ingest_loop, "edge-ingest"), (self._worker, "edge-train")):
            t = threading.Thread(target=target, name=f"{name}-{short_id(self.identity.node_id)[:6]}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self.link.stop()
        self.store.close()
