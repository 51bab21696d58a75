"""The edge server, assembled: an ingest thread and a training worker, decoupled by a queue.

ingest (MQTT drain -> verify/decrypt/validate -> persist -> ack) never waits for training;
the worker trains a customer's dense layers when that customer's batch for the current round
has been persisted, signs the update and submits it; unsent updates are retried.

Crash safety (kill -9 at any point): a batch is acknowledged only after it is committed, so the
device resends whatever was lost with the in-memory inbox. The training queue is not durable
either; instead the worker reconciles it with the database at start and every
``resubmit_every_s``: every selected customer with a batch for its task's current round and no
update yet is (re)scheduled. Task specs and the latest RoundStart are stored, so this works
before the broker re-delivers the retained control messages. An update is saved before it is
submitted and marked after the coordinator's final answer; a crash in between resends the same
bytes, which the coordinator answers with "duplicate" (it keys updates by their hash).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from crowdfl.envelope import open_envelope, seal
from crowdfl.errors import CrowdflError
from crowdfl.identity import Identity, PublicIdentity, short_id
from crowdfl.metrics import Histogram
from crowdfl.messages import CODEC, Ack, ModelUpdate, ModelWeights, Nack, RoundStart, TaskSpec
from crowdfl.mqtt import PREFIX, Incoming, MqttLink, ack_topic
from crowdfl.receipts import SignedReceipt, batches_root, decode_receipt, open_receipt

from .ingest import Ingestor
from .store import EdgeStore
from .submit import CoordinatorClient
from .trainer import HeadTrainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    task_id: str
    round: int
    customer: str


# seconds; training one customer's head is ~0.5-3 s on the project's machines
TRAIN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
MAX_RETRY_DELAY_S = 300.0


@dataclass
class EdgeStats:
    """Counters since start (each written by one thread; read by the metrics endpoint)."""

    trained: int = 0
    train_failures: int = 0
    submitted: int = 0  # the coordinator took it (received, or duplicate of one it already had)
    submit_duplicates: int = 0
    submit_rejected: int = 0
    submit_retries: int = 0
    rescheduled: int = 0  # jobs re-created from the database (restart, failed job, lost queue)
    nacked: int = 0  # device envelopes refused for good and answered with a Nack
    control_rejected: Counter[str] = field(default_factory=Counter)  # refused task/round messages, by reason
    train_seconds: float = 0.0
    train_time: Histogram = field(default_factory=lambda: Histogram(TRAIN_BUCKETS))


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
        ingest_workers: int = 0,
        retention_s: float = 90 * 86400.0,
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
        self.retention_s = retention_s
        self.tasks: dict[str, TaskSpec] = {}
        self._trainers: dict[str, HeadTrainer] = {}
        self.rounds: dict[str, RoundStart] = {}
        self.ingestor = Ingestor(identity, store, self.tasks.get, workers=ingest_workers)
        self.jobs: queue.Queue[TrainJob] = queue.Queue()
        self.stats = EdgeStats()
        self._models: dict[str, list[np.ndarray]] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._queued: set[TrainJob] = set()
        self._queued_lock = threading.Lock()
        self._retry_at: dict[TrainJob, tuple[float, int]] = {}  # failed job -> (next attempt, failures)
        self.started_at = 0.0

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
            for device, refused in drained.nacks.items():
                nack = Nack(device, np.array([q for q, _ in refused], dtype=np.uint64), tuple(r for _, r in refused))
                self.link.publish(ack_topic(short_id(self.identity.node_id), short_id(device)), seal(CODEC.encode(nack), self.identity, time.time_ns()), qos=1)
                self.stats.nacked += len(refused)
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
                    self.store.save_round(rs.task_id, rs.round, opened.body)
                    self.rounds[rs.task_id] = rs
                    self._schedule_round(rs.task_id)
            else:
                spec = CODEC.decode(opened.body, TaskSpec)
                if spec.task_id not in self.tasks:
                    self.store.save_task(spec.task_id, opened.body)
                    self.tasks[spec.task_id] = spec
                    self._schedule_round(spec.task_id)
        except CrowdflError as exc:
            self.stats.control_rejected[exc.code] += 1
            log.warning("rejected control message on %s: %s", m.topic, exc)

    def restore(self) -> None:
        """Load the stored task specs and round starts (verified when they arrived)."""
        for body in self.store.task_specs():
            spec = CODEC.decode(body, TaskSpec)
            self.tasks.setdefault(spec.task_id, spec)
        for body in self.store.round_starts():
            rs = CODEC.decode(body, RoundStart)
            prev = self.rounds.get(rs.task_id)
            if prev is None or rs.round > prev.round:
                self.rounds[rs.task_id] = rs

    def _schedule_round(self, task_id: str) -> int:
        """Queue every selected customer of the task's current round that has a batch and no update."""
        rs = self.rounds.get(task_id)
        if rs is None or task_id not in self.tasks:
            return 0
        n = 0
        for device in sorted(self.store.awaiting_training(task_id, rs.round)):
            n += self._maybe_schedule(task_id, rs.round, device)
        return n

    def purge_expired(self, now: float | None = None) -> int:
        """Delete the batches (the evidence) of tasks whose deadline plus the retention has passed."""
        now = time.time() if now is None else now
        n = 0
        for task_id, spec in list(self.tasks.items()):
            if spec.deadline + self.retention_s < now:
                gone = self.store.purge_batches(task_id)
                if gone:
                    log.info("retention over for task %s: deleted %d batches", task_id[:12], gone)
                n += gone
        return n

    def reconcile(self) -> int:
        """Re-create training jobs the in-memory queue lost (restart) or that failed (after a back-off)."""
        self.purge_expired()
        for job in [j for j in self._retry_at if self.rounds.get(j.task_id) is None or self.rounds[j.task_id].round != j.round]:
            del self._retry_at[job]  # rounds that are over: nothing left to retry
        n = 0
        for task_id in list(self.rounds):
            n += self._schedule_round(task_id)
        self.stats.rescheduled += n
        if n:
            log.info("re-scheduled %d training job(s) from the database", n)
        return n

    def _maybe_schedule(self, task_id: str, round_: int, device: str) -> bool:
        rs = self.rounds.get(task_id)
        if rs is None or rs.round != round_ or device not in rs.selected or task_id not in self.tasks:
            return False  # the data stays stored and is used in the device's next selected round
        job = TrainJob(task_id, round_, device)
        retry = self._retry_at.get(job)
        if retry is not None and time.monotonic() < retry[0]:
            return False
        with self._queued_lock:
            if job in self._queued:
                return False
            self._queued.add(job)
        self.jobs.put(job)
        return True

    @property
    def queue_depth(self) -> int:
        with self._queued_lock:
            return len(self._queued)

    # -- training side -------------------------------------------------------------------------
    def _global_weights(self, model_hash: str) -> list[np.ndarray]:
        if model_hash not in self._models:
            mw = CODEC.decode(self.fetch_artifact(model_hash), ModelWeights)
            self._models[model_hash] = [np.asarray(w) for w in mw.weights]
        return self._models[model_hash]

    def _trainer(self, spec: TaskSpec) -> HeadTrainer:
        """One trainer per task, built on its first job and reused for every customer and round."""
        if spec.task_id not in self._trainers:
            self._trainers[spec.task_id] = HeadTrainer(spec)
        return self._trainers[spec.task_id]

    def train_job(self, job: TrainJob) -> None:
        if self.store.has_update(job.task_id, job.round, job.customer):
            return
        spec = self.tasks[job.task_id]
        rs = self.rounds[job.task_id]
        if rs.round != job.round:
            return  # the round moved on while the job waited; its data is used in the next one
        receipt = self._round_receipt(job)
        data = self.store.customer_data(job.customer, job.task_id, spec.feature_dim, max_round=job.round)
        seed = (self.seed * 1_000_003 + job.round * 7919 + int(job.customer[:8], 16)) % 2**31
        result = self._trainer(spec).train(self._global_weights(rs.global_model_hash), data, seed)
        if result.num_samples != receipt.receipt.num_samples:
            raise RuntimeError(f"trained on {result.num_samples} samples, the device's receipt says {receipt.receipt.num_samples}")
        update = ModelUpdate(
            job.task_id, job.round, job.customer, rs.global_model_hash, tuple(result.weights),
            result.num_samples, receipt.receipt.batches_root, result.loss, receipt.raw,
        )
        env = seal(CODEC.encode(update), self.identity, time.time_ns())
        self.store.save_update(job.task_id, job.round, job.customer, env, hashlib.sha256(env).hexdigest(), result.seconds)
        self.stats.trained += 1
        self.stats.train_seconds += result.seconds
        self.stats.train_time.observe(result.seconds)
        log.info("trained %s round %d on %d samples in %.2fs (loss %.3f)", job.customer[:12], job.round, result.num_samples, result.seconds, result.loss)

    def _round_receipt(self, job: TrainJob) -> SignedReceipt:
        """The device's receipt for the round, once it covers exactly the batches stored here.

        An update is trained on those batches and nothing else, so its sample count and inputs
        digest are the device's own; until an earlier batch arrives the job is retried."""
        batches = self.store.batches(job.customer, job.task_id, max_round=job.round)
        mine = [decode_receipt(b.receipt) for b in batches if b.round == job.round and b.receipt]
        if not mine:
            raise RuntimeError(f"no receipt from {job.customer[:12]} for round {job.round}")
        latest = max(mine, key=lambda r: r.receipt.num_batches)  # the latest covers every batch before it
        # the one signature checked per device and round (ingest only decoded the receipts)
        signed = open_receipt(latest.raw)
        root = batches_root([bytes.fromhex(b.batch_digest) for b in batches])
        if (signed.receipt.batches_root, signed.receipt.num_batches, signed.receipt.num_samples) != (
            root, len(batches), sum(len(b.sample_ids) for b in batches)
        ):
            raise RuntimeError(f"receipt of {job.customer[:12]} round {job.round} does not cover the batches stored here (yet)")
        return signed

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
                    self.stats.submit_duplicates += int(res.status == "duplicate")
            elif res.reached:  # refused for now (e.g. this edge not registered yet): the next one may pass
                self.stats.submit_retries += 1
                log.warning("coordinator refused update %d for now (%s); it stays queued", update_id, res.detail)
            else:
                self.stats.submit_retries += 1
                log.info("coordinator unreachable (%s); update %d stays queued", res.detail, update_id)
                break

    def _run_job(self, job: TrainJob) -> None:
        with self._queued_lock:
            self._queued.discard(job)
        try:
            self.train_job(job)
            self._retry_at.pop(job, None)
        except Exception:  # a failed job must not kill the worker; reconcile() retries it later
            failures = self._retry_at.get(job, (0.0, 0))[1] + 1
            delay = min(MAX_RETRY_DELAY_S, self.resubmit_every_s * 2 ** (failures - 1))
            self._retry_at[job] = (time.monotonic() + delay, failures)
            self.stats.train_failures += 1
            log.exception("training %s round %d failed (attempt %d); retrying in %.0fs", job.customer[:12], job.round, failures, delay)

    def _worker(self) -> None:
        last_reconcile = 0.0
        while not self._stop.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                job = None
            try:
                if job is not None:
                    self._run_job(job)
                    self.submit_pending()
                elif time.monotonic() - last_reconcile > self.resubmit_every_s:
                    last_reconcile = time.monotonic()
                    self.submit_pending()
                    self.reconcile()
            except Exception:  # e.g. the database is briefly unreachable: the worker must live on
                log.exception("submission or reconcile failed; retrying in %.0fs", self.resubmit_every_s)

    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.drain_once()
            except Exception:
                log.exception("ingest drain failed; continuing")
                time.sleep(0.5)

    def start(self) -> None:
        self.started_at = time.time()
        self.restore()
        self.ingestor.refresh_devices()
        self.link.start()
        for target, name in ((self._ingest_loop, "edge-ingest"), (self._worker, "edge-train")):
            t = threading.Thread(target=target, name=f"{name}-{short_id(self.identity.node_id)[:6]}", daemon=True)
            t.start()
            self._threads.append(t)

    def threads_alive(self) -> dict[str, bool]:
        return {t.name: t.is_alive() for t in self._threads}

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self.ingestor.close()
        self.link.stop()
        self.store.close()
