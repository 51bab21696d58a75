"""Ingest of feature batches: verify, dedupe, decrypt, validate, persist, acknowledge.

The ingest loop drains the MQTT inbox in batches. Each message either becomes an accepted batch,
a duplicate (the same envelope again: acknowledged again, stored once) or a rejection with a
reason (counted, logged, stored in the rejections table). A bad message never stops ingestion and
never changes anything already accepted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from crowdfl.envelope import Sealed, decrypt, parse, verify
from crowdfl.errors import WireError
from crowdfl.identity import Identity, PublicIdentity, short_id
from crowdfl.messages import CODEC, FeatureBatch, TaskSpec
from crowdfl.mqtt import PREFIX, Incoming
from crowdfl.task import laplace_scale

from .store import AcceptedBatch, EdgeStore

log = logging.getLogger(__name__)

MAX_SAMPLES_PER_BATCH = 4096
# |Laplace(b)| > 60 b has probability e^-60: a value beyond 1 + 60 b was not produced honestly
NOISE_BOUND_SCALES = 60.0


@dataclass
class IngestStats:
    accepted: int = 0
    duplicates: int = 0
    samples: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Drained:
    accepted: list[AcceptedBatch]
    acks: dict[str, list[int]]  # device node id -> seqs to acknowledge
    rejections: list[tuple[str, str, str]]  # (reason, detail, topic)


def validate_batch(batch: FeatureBatch, spec: TaskSpec) -> None:
    """Shape and value checks of a decrypted batch against its task; raises WireError."""
    n = batch.sample_ids.shape[0] if batch.sample_ids.ndim == 1 else -1
    if n <= 0 or n > MAX_SAMPLES_PER_BATCH:
        raise WireError("bad_shape", f"sample_ids must be a vector of 1..{MAX_SAMPLES_PER_BATCH} ids")
    if batch.sample_ids.dtype != np.uint64 or batch.features.dtype != np.float32 or batch.labels.dtype != np.int8:
        raise WireError("bad_dtype", "expected uint64 ids, float32 features, int8 labels")
    if batch.features.shape != (n, spec.feature_dim) or batch.labels.shape != (n,):
        raise WireError("bad_shape", f"features {batch.features.shape} / labels {batch.labels.shape} for {n} samples")
    if not 1 <= batch.round <= spec.rounds:
        raise WireError("bad_round", f"round {batch.round} outside 1..{spec.rounds}")
    if batch.epsilon != spec.epsilon or batch.clip_l1 != spec.clip_l1:
        raise WireError("privacy_mismatch", f"epsilon {batch.epsilon} / clip {batch.clip_l1} differ from the task's")
    if len(np.unique(batch.sample_ids)) != n or int(batch.sample_ids.max()) >= 2**63:
        raise WireError("bad_ids", "sample ids must be unique and below 2^63")
    if not np.isfinite(batch.features).all():
        raise WireError("non_finite", "features contain NaN or Inf")
    bound = 1.0 + NOISE_BOUND_SCALES * laplace_scale(spec.epsilon, spec.clip_l1, spec.feature_dim)
    if float(np.abs(batch.features).max()) > bound:
        raise WireError("out_of_bound", f"a feature exceeds {bound:.3g}: not a clipped, noised vector")
    if batch.labels.min() < 0 or batch.labels.max() >= spec.num_classes:
        raise WireError("bad_label", f"labels outside 0..{spec.num_classes - 1}")


class Ingestor:
    def __init__(self, identity: Identity, store: EdgeStore, task_lookup: Callable[[str], TaskSpec | None]) -> None:
        self.identity = identity
        self.store = store
        self.task_lookup = task_lookup
        self.short = short_id(identity.node_id)
        self.stats = IngestStats()
        self._devices: dict[str, PublicIdentity] = {}

    def refresh_devices(self) -> None:
        self._devices = {
            nid: PublicIdentity(bytes.fromhex(nid), bytes.fromhex(enc)) for nid, enc in self.store.active_devices().items()
        }

    def drain(self, msgs: Sequence[Incoming]) -> Drained:
        """Process a drained batch of messages and persist the outcome in one transaction."""
        parsed: list[tuple[Incoming, Sealed]] = []
        rejections: list[tuple[str, str, str]] = []
        acks: dict[str, list[int]] = {}
        for m in msgs:
            try:
                parsed.append((m, self._authenticate(m)))
            except WireError as exc:
                rejections.append((exc.code, exc.detail, m.topic))
        known = self.store.known_envelopes([(s.sender_id, s.seq) for _, s in parsed])
        accepted: list[AcceptedBatch] = []
        this_drain: dict[tuple[str, int], str] = {}
        for m, sealed in parsed:
            key = (sealed.sender_id, sealed.seq)
            prior = known.get(key) or this_drain.get(key)
            try:
                if prior is not None:
                    if prior != sealed.digest:
                        raise WireError("seq_reuse", f"seq {sealed.seq} was already used for a different envelope")
                    self.stats.duplicates += 1
                    acks.setdefault(sealed.sender_id, []).append(sealed.seq)
                    continue
                batch = CODEC.decode(decrypt(sealed, self.identity), FeatureBatch)
                spec = self.task_lookup(batch.task_id)
                if spec is None:
                    raise WireError("unknown_task", f"task {batch.task_id[:12]} is not known here")
                validate_batch(batch, spec)
                ids = set(int(x) for x in batch.sample_ids)
                if self.store.released_sample_ids(sealed.sender_id, batch.task_id, ids) or any(
                    ids & set(int(x) for x in a.sample_ids) for a in accepted if a.device == sealed.sender_id and a.task_id == batch.task_id
                ):
                    raise WireError("sample_reuse", "a sample id was already received from this device")
            except WireError as exc:
                rejections.append((exc.code, exc.detail, m.topic))
                continue
            this_drain[key] = sealed.digest
            accepted.append(
                AcceptedBatch(sealed.sender_id, sealed.seq, sealed.digest, batch.task_id, batch.round, batch.sample_ids, batch.features, batch.labels)
            )
            acks.setdefault(sealed.sender_id, []).append(sealed.seq)
        self.store.persist(accepted, rejections)
        self.stats.accepted += len(accepted)
        self.stats.samples += sum(len(a.sample_ids) for a in accepted)
        for reason, detail, topic in rejections:
            self.stats.rejected[reason] += 1
            log.warning("rejected message on %s: %s: %s", topic, reason, detail)
        return Drained(accepted, acks, rejections)

    def _authenticate(self, m: Incoming) -> Sealed:
        parts = m.topic.split("/")
        if len(parts) != 5 or "/".join(parts[:3]) != f"{PREFIX}/feat":
            raise WireError("bad_topic", f"unexpected topic {m.topic}")
        if parts[3] != self.short:
            raise WireError("bad_topic", "feature topic of another edge server")
        sealed = parse(m.payload)
        if short_id(sealed.sender_id) != parts[4]:
            raise WireError("topic_mismatch", "sender key does not match the topic's device")
        sender = self._devices.get(sealed.sender_id)
        if sender is None:
            self.refresh_devices()
            sender = self._devices.get(sealed.sender_id)
        if sender is None:
            raise WireError("unknown_sender", f"device {sealed.sender_id[:16]} is not registered with this edge")
        if not sealed.encrypted:
            raise WireError("not_encrypted", "feature batches must be encrypted")
        verify(sealed, sender)
        return sealed
