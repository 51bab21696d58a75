"""The agent, assembled: reacts to tasks and rounds, releases noisy features, keeps the spool moving.

Data flow of one contribution:
usage_log -> samples -> front (int8 TFLite) -> privacy (clip + Laplace) -> state (ledger + spool)
-> uplink (MQTT) -> edge server, which acknowledges.
"""

from __future__ import annotations

import dataclasses
import logging
import errno
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crowdfl.envelope import open_envelope, seal
from crowdfl.errors import CrowdflError, PrivacyError, WireError
from crowdfl.identity import Identity, PublicIdentity, short_id
from crowdfl.front import FrontModel
from crowdfl.messages import CODEC, Ack, FeatureBatch, Nack, RoundStart, TaskSpec
from crowdfl.receipts import ContributionReceipt, batch_digest, batches_root, sign_receipt
from crowdfl.mqtt import PREFIX, Incoming, MqttLink, ack_topic, feature_topic

from .privacy import PrivacyPolicy, privatise_features, randomised_response, releasable, release_spend, select_within_caps
from .samples import samples_from_log
from .state import AgentState
from .uplink import Uplink
from .usage_log import UsageLog

log = logging.getLogger(__name__)


@dataclass
class ActiveTask:
    spec: TaskSpec
    front: FrontModel
    last_round: int = 0


@dataclass
class AgentStats:
    contributions: int = 0
    samples_released: int = 0
    rejected_messages: int = 0
    refused_tasks: int = 0
    refused_envelopes: int = 0  # refused for good by the edge (Nack) and dropped from the spool
    budget_refusals: int = 0  # rounds where every candidate sample would pass the per-hour/day caps
    storage_errors: int = 0  # writes to the state database that failed (a full disk): retried, never half-done


# errors of the device's own storage: the operation is retried later, the agent keeps running
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


def storage_error(exc: BaseException) -> bool:
    """A failure of the local disk (SQLite's "database or disk is full", ENOSPC, EIO, ...)."""
    if isinstance(exc, sqlite3.OperationalError):
        return True
    return isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS


class Agent:
    def __init__(
        self,
        identity: Identity,
        coordinator: PublicIdentity,
        edge: PublicIdentity,
        usage_log: UsageLog,
        state: AgentState,
        link: MqttLink,
        fetch_artifact: Callable[[str], bytes],
        model_dir: Path,
        policy: PrivacyPolicy,
        rng: np.random.Generator,
        resend_after_s: float = 30.0,
        simulated_noise: bool = False,
    ) -> None:
        self.identity = identity
        self.coordinator = coordinator
        self.edge = edge
        self.usage_log = usage_log
        self.state = state
        self.link = link
        self.uplink = Uplink(link, state, resend_after_s)
        self.fetch_artifact = fetch_artifact
        self.model_dir = Path(model_dir)
        self.policy = policy
        self.rng = rng
        # a device draws its noise from the OS CSPRNG; a simulation (crowdfl.sim.demo) may draw it
        # from its seeded ``rng`` so that a run is reproducible
        self.simulated_noise = simulated_noise
        self.tasks: dict[str, ActiveTask] = {}
        self._unjoined: dict[str, TaskSpec] = {}  # verified specs whose front model could not be fetched yet
        # selected rounds the usage log had no fresh sample for yet (e.g. a round that starts before
        # the first poll of a new device is stored): retried while the round is still the current one
        self._waiting: dict[str, int] = {}
        self._next_retry = 0.0
        self.retry_every_s = 30.0
        self.stats = AgentStats()
        self.short = short_id(identity.node_id)

    def noise_source(self) -> np.random.Generator | None:
        """Where the release's noise comes from: None (the exact sampler on the OS CSPRNG) on a
        device; the seeded generator only in a simulation that asked for reproducible runs."""
        return self.rng if self.simulated_noise else None

    @staticmethod
    def subscriptions(short: str) -> list[str]:
        return [f"{PREFIX}/tasks/+", f"{PREFIX}/tasks/+/round", ack_topic("+", short)]

    # -- inbound -----------------------------------------------------------------------------
    def handle(self, msg: Incoming) -> None:
        try:
            if msg.topic.startswith(f"{PREFIX}/ack/"):
                opened = open_envelope(msg.payload, lookup_sender=self._edge_only)
                answer = CODEC.decode(opened.body)
                if isinstance(answer, Ack):
                    self._on_ack(answer)
                elif isinstance(answer, Nack):
                    self._on_nack(answer)
                else:
                    raise WireError("malformed", f"{type(answer).__name__} on an acknowledgement topic")
            elif msg.topic.endswith("/round"):
                opened = open_envelope(msg.payload, lookup_sender=self._coordinator_only)
                self._on_round(CODEC.decode(opened.body, RoundStart))
            elif msg.topic.startswith(f"{PREFIX}/tasks/"):
                opened = open_envelope(msg.payload, lookup_sender=self._coordinator_only)
                self._on_task(CODEC.decode(opened.body, TaskSpec))
        except CrowdflError as exc:
            self.stats.rejected_messages += 1
            log.warning("rejected message on %s: %s", msg.topic, exc)

    def _coordinator_only(self, sender: str) -> PublicIdentity | None:
        return self.coordinator if sender == self.coordinator.node_id else None

    def _edge_only(self, sender: str) -> PublicIdentity | None:
        return self.edge if sender == self.edge.node_id else None

    def _on_task(self, spec: TaskSpec) -> None:
        if spec.task_id in self.tasks:
            return
        try:
            self.policy.check(spec)
        except PrivacyError as exc:
            self.stats.refused_tasks += 1
            log.warning("refused task %s: %s", spec.task_id[:12], exc.detail)
            return
        try:
            front = FrontModel(self._model_bytes(spec.front_model_hash), spec.front_model_hash)
        except CrowdflError:
            # e.g. the coordinator is unreachable at boot: the (retained) task is not sent again,
            # so keep the verified spec and retry when one of its rounds starts
            self._unjoined[spec.task_id] = spec
            raise
        self._unjoined.pop(spec.task_id, None)
        if front.input_shape != (spec.window_hours, spec.num_channels) or front.feature_dim != spec.feature_dim:
            raise WireError("malformed", f"front model shapes {front.input_shape}->{front.feature_dim} do not match the task")
        self.tasks[spec.task_id] = ActiveTask(spec, front)
        log.info("joined task %s (%r): epsilon %.3g per sample, %d rounds", spec.task_id[:12], spec.title, spec.epsilon, spec.rounds)

    def _model_bytes(self, sha256: str) -> bytes:
        path = self.model_dir / f"{sha256}.tflite"
        if path.exists():
            return path.read_bytes()  # FrontModel checks the hash again before use
        data = self.fetch_artifact(sha256)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)
        return data

    def _on_round(self, rs: RoundStart) -> None:
        if rs.task_id not in self.tasks and rs.task_id in self._unjoined:
            self._on_task(self._unjoined[rs.task_id])
        task = self.tasks.get(rs.task_id)
        if task is None or rs.round <= task.last_round:
            return
        task.last_round = rs.round
        if self.identity.node_id not in rs.selected:
            log.info("round %d of task %s: not selected", rs.round, rs.task_id[:12])
            return
        done = self.state.released_in_round(rs.task_id, rs.round)
        if done:
            # the retained RoundStart is delivered again after a restart; the spool resends the batch
            log.info("round %d of task %s: already contributed %d samples", rs.round, rs.task_id[:12], done)
            return
        self._waiting.pop(rs.task_id, None)
        if self._contribute_or_wait(task, rs.round) is None:
            self._waiting[rs.task_id] = rs.round

    def _contribute_or_wait(self, task: ActiveTask, round_: int) -> int | None:
        """``contribute``, except that a failing disk leaves the round to be retried (the release is
        one transaction: nothing of it was kept)."""
        try:
            return self.contribute(task, round_)
        except (sqlite3.OperationalError, OSError) as exc:
            if not storage_error(exc):
                raise
            self._storage_failed(f"round {round_} of task {task.spec.task_id[:12]}: nothing released, retried in {self.retry_every_s:g} s", exc)
            return None

    def _storage_failed(self, what: str, exc: BaseException) -> None:
        self.stats.storage_errors += 1
        log.error("local storage failed (%s): %s", exc, what)

    def retry_waiting(self) -> None:
        """Contribute to selected rounds that found no fresh sample, if they are still current."""
        for task_id, round_ in list(self._waiting.items()):
            task = self.tasks.get(task_id)
            if task is None or task.last_round != round_ or self.state.released_in_round(task_id, round_):
                self._waiting.pop(task_id, None)
            elif self._contribute_or_wait(task, round_) is not None:
                self._waiting.pop(task_id, None)

    def _on_ack(self, ack: Ack) -> None:
        if ack.device != self.identity.node_id:
            raise WireError("malformed", "acknowledgement addressed to another device")
        self.uplink.acknowledged([int(s) for s in ack.seqs])

    def _on_nack(self, nack: Nack) -> None:
        """The edge refused these envelopes for good: resending cannot help, so they leave the spool
        (their samples stay released: the privacy ledger never hands them out again)."""
        if nack.device != self.identity.node_id or len(nack.reasons) != len(nack.seqs):
            raise WireError("malformed", "refusal addressed to another device, or seqs and reasons differ in number")
        seqs = [int(s) for s in nack.seqs]
        dropped = self.uplink.acknowledged(seqs)
        self.stats.refused_envelopes += dropped
        log.warning("the edge refused envelope(s) %s for good (%s); dropped from the spool", seqs, ", ".join(sorted(set(nack.reasons))))

    # -- outbound ----------------------------------------------------------------------------
    def contribute(self, task: ActiveTask, round_: int) -> int | None:
        """Release ``samples_per_round`` fresh samples for a round; returns the spool seq."""
        spec = task.spec
        samples = samples_from_log(self.usage_log, spec)
        fresh = np.flatnonzero(np.isin(samples.ids, self.state.unreleased(releasable(samples.ids, spec))))
        if len(fresh) == 0:
            log.warning("round %d: no unreleased samples left in the usage log", round_)
            return None
        order = self.rng.permutation(fresh)
        ids = [int(samples.ids[i]) for i in order]
        probe = release_spend(ids, spec)  # every hour and day the candidates touch
        spent = self.state.spent(probe.hours, probe.days)
        keep = set(select_within_caps(ids, spec, spent, self.policy.caps, spec.samples_per_round))
        pick = [i for i, sid in zip(order, ids) if sid in keep]
        if not pick:
            self.stats.budget_refusals += 1
            log.warning("round %d: every unreleased sample would exceed this device's budget per hour/day; nothing released", round_)
            return None
        chosen = samples.take(np.sort(np.asarray(pick)))
        noisy = privatise_features(task.front(chosen.inputs), spec, self.noise_source())
        labels = randomised_response(chosen.labels, spec.num_classes, spec.label_epsilon, self.rng)
        batch = FeatureBatch(spec.task_id, round_, chosen.ids, noisy, labels.astype(np.int8), spec.epsilon, spec.clip_l1)
        digest = batch_digest(batch)
        prior = self.state.batch_digests(spec.task_id)
        receipt = sign_receipt(
            ContributionReceipt(
                spec.task_id, round_, self.identity.node_id, self.edge.node_id, sum(n for _, n in prior) + len(chosen),
                len(prior) + 1, batches_root([d for d, _ in prior] + [digest]), float(spec.epsilon),
            ),
            self.identity,
        )
        body = CODEC.encode(dataclasses.replace(batch, receipt=receipt.raw))
        topic = feature_topic(short_id(self.edge.node_id), self.short)
        seq = self.state.release(
            spec.task_id, round_, chosen.ids, spec.epsilon, topic, lambda s: seal(body, self.identity, s, self.edge, context=topic.encode()),
            spend=release_spend(chosen.ids, spec), caps=self.policy.caps,
            receipt=(digest, receipt.raw),
        )
        self.stats.contributions += 1
        self.stats.samples_released += len(chosen)
        log.info("round %d: released %d samples as seq %d (epsilon %.3g each)", round_, len(chosen), seq, spec.epsilon)
        self.uplink.flush()
        return seq

    # -- loop --------------------------------------------------------------------------------
    def step(self, timeout: float = 0.2) -> None:
        try:
            msg = self.link.inbox.get(timeout=timeout)
        except queue.Empty:
            msg = None
        try:
            if msg is not None:
                self.handle(msg)
            if self._waiting and time.monotonic() >= self._next_retry:
                self._next_retry = time.monotonic() + self.retry_every_s
                self.retry_waiting()
            self.uplink.flush()
        except (sqlite3.OperationalError, OSError) as exc:
            if not storage_error(exc):
                raise
            # e.g. an acknowledgement that could not be recorded: the envelope stays in the spool,
            # is resent, and the edge (which stored it once) acknowledges it again
            self._storage_failed("an acknowledgement or a resend was not recorded; retried", exc)

    def run(self, stop: threading.Event, shutdown_grace_s: float = 0.0, before_close: Callable[[], None] | None = None) -> None:
        """Serve until ``stop``; then give the edge ``shutdown_grace_s`` to acknowledge the spool.

        Whatever is still unacknowledged stays in the spool and is resent on the next start.
        ``before_close`` runs after the network loop ends and before the databases close (the
        caller stops its threads that write to them there).
        """
        self.link.start()
        try:
            while not stop.is_set():
                self.step()
            self.drain_spool(shutdown_grace_s)
        finally:
            try:
                self.link.stop()
                if before_close is not None:
                    before_close()
            finally:
                self.state.close()
                self.usage_log.close()

    def drain_spool(self, timeout_s: float) -> int:
        """Keep publishing and taking acknowledgements until the spool is empty or time is up; returns what is left.

        Waits for the broker connection too (a stop right after start-up still flushes when it can).
        """
        end = time.monotonic() + timeout_s
        while self.state.pending(limit=1) and time.monotonic() < end:
            if self.link.connected.is_set():
                self.step(timeout=min(0.1, max(0.0, end - time.monotonic())))
            else:
                time.sleep(0.05)
        left = len(self.state.pending(limit=1_000_000))
        if left:
            log.warning("stopping with %d unacknowledged envelope(s) in the spool; they are resent on the next start", left)
        return left

