"""Ingest of feature batches: verify, dedupe, decrypt, validate, persist, acknowledge.

The ingest loop drains the MQTT inbox in batches. Each message either becomes an accepted batch,
a duplicate (the same envelope again: acknowledged again, stored once) or a rejection with a
reason (counted, logged, stored in the rejections table). A bad message never stops ingestion and
never changes anything already accepted.

Where the time goes (bench/ingest.py): a feature batch is a channel envelope (crowdfl/envelope.py),
so opening one is one AES-GCM pass under the device's channel key, derived once per device and
kept; no public-key operation is on the per-message path. The device's signed receipt in each
batch is decoded and bound to the envelope here, and its signature is checked once per device and
round, on the receipt the update carries (``EdgeServer._round_receipt``). A byte-identical resend
skips all crypto, a batch's digest is hashed from its decrypted encoding (not re-encoded), a drain
is one bulk INSERT, and sample-id reuse is checked against an in-memory index instead of a query
per batch. Opening and decoding can also run in a process pool (``ingest_workers``), which pays
off only when the machine has idle cores.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from crowdfl.envelope import Channel, Sealed, parse
from crowdfl.errors import WireError
from crowdfl.identity import Identity, PublicIdentity, short_id
from crowdfl.messages import CODEC, FeatureBatch, TaskSpec
from crowdfl.mqtt import PREFIX, Incoming
from crowdfl.receipts import SignedReceipt, batch_digest_of_encoding, decode_receipt
from crowdfl.task import laplace_scale

from .store import AcceptedBatch, EdgeStore

log = logging.getLogger(__name__)

MAX_SAMPLES_PER_BATCH = 4096
# |Laplace(b)| > 60 b has probability e^-60: a value beyond 1 + 60 b was not produced honestly
NOISE_BOUND_SCALES = 60.0
# (device, seq) is stored in a BIGINT (signed in SQLite and PostgreSQL); a larger seq would fail
# the whole drain's transaction, so it is a rejection instead
MAX_SEQ = 2**63
# An unknown sender is looked up by its key (one indexed read), then remembered as unknown for a
# while, so a flood of messages from unregistered keys costs neither a table reload nor a query each.
UNKNOWN_SENDER_TTL_S = 10.0
MAX_UNKNOWN_SENDERS = 100_000


@dataclass
class IngestStats:
    """Counters since start (written by the ingest thread only; read by the metrics endpoint)."""

    messages: int = 0
    accepted: int = 0
    duplicates: int = 0
    samples: int = 0
    drains: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


# Refusals that resending cannot change, of envelopes whose channel tag verified (so the device
# itself sent them): answered with a Nack so the device stops resending. A refusal before the tag
# is checked is never answered (anyone could have sent it: the checks in ``_admit``, and
# decrypt_failed, the tag itself), nor one that may pass later (unknown_task: the task's spec has
# not reached this edge yet).
TRANSIENT_REJECTIONS = frozenset({"unknown_task", "decrypt_failed"})


@dataclass(frozen=True)
class Drained:
    accepted: list[AcceptedBatch]
    acks: dict[str, list[int]]  # device node id -> seqs to acknowledge
    rejections: list[tuple[str, str, str]]  # (reason, detail, topic)
    nacks: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # device -> (seq, reason) refused for good


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
    ordered = np.sort(batch.sample_ids)
    if (ordered[1:] == ordered[:-1]).any() or int(ordered[-1]) >= 2**63:
        raise WireError("bad_ids", "sample ids must be unique and below 2^63")
    if not np.isfinite(batch.features).all():
        raise WireError("non_finite", "features contain NaN or Inf")
    bound = 1.0 + NOISE_BOUND_SCALES * laplace_scale(spec.epsilon, spec.clip_l1, spec.feature_dim)
    if float(np.abs(batch.features).max()) > bound:
        raise WireError("out_of_bound", f"a feature exceeds {bound:.3g}: not a clipped, noised vector")
    if batch.labels.min() < 0 or batch.labels.max() >= spec.num_classes:
        raise WireError("bad_label", f"labels outside 0..{spec.num_classes - 1}")


def check_batch_receipt(batch: FeatureBatch, device: str, edge: str) -> SignedReceipt:
    """The device's signed receipt must ride with every batch and name this batch's task, round and edge.

    Decoded, not verified: its signature, and whether its root covers exactly the stored batches,
    are checked when training (once per device and round; an earlier batch may still be on its
    way); the coordinator refuses an update without a matching, verifying receipt."""
    signed = decode_receipt(batch.receipt)
    r = signed.receipt
    if r.device != device:
        raise WireError("bad_receipt", "receipt is signed by another device than the envelope")
    if (r.task_id, r.round) != (batch.task_id, batch.round):
        raise WireError("bad_receipt", f"receipt is for task {r.task_id[:12]} round {r.round}, not the batch's")
    if r.edge != edge:
        raise WireError("bad_receipt", "receipt names another edge server")
    if r.epsilon != batch.epsilon:
        raise WireError("bad_receipt", "receipt's epsilon differs from the batch's")
    return signed


Opened = tuple[FeatureBatch, bytes] | tuple[str, str]  # (batch, its receipt-less digest), or (reason, detail)


def open_batches(items: Sequence[tuple[Sealed, Channel, bytes]]) -> list[Opened]:
    """Authenticate, decrypt and decode channel envelopes -> (batch, batch digest) or (reason, detail).

    ``items`` are (envelope, the sender's channel, context: the topic it came on). Pure and
    stateless, so a process pool can run it; everything that needs the database stays in the caller.
    """
    out: list[Opened] = []
    for sealed, channel, context in items:
        try:
            plain = channel.open(sealed, context)
            batch = CODEC.decode(plain, FeatureBatch)
            out.append((batch, batch_digest_of_encoding(plain, len(batch.receipt))))
        except WireError as exc:
            out.append((exc.code, exc.detail))
    return out


def _open_in_worker(edge: tuple[bytes, bytes], items: Sequence[tuple[bytes, bytes, bytes, bytes, bytes]]) -> list[Opened]:
    """Process-pool entry point: plain bytes in (envelope, the device's keys, its channel key, topic),
    the edge's public keys with each chunk (no per-process globals)."""
    edge_pub = PublicIdentity(*edge)
    todo = [
        (parse(raw), Channel(PublicIdentity(sign, enc), edge_pub, key), context)  # parsed in the edge already: cannot fail
        for raw, sign, enc, key, context in items
    ]
    return open_batches(todo)


def make_pool(workers: int) -> Executor:
    """A process pool for :func:`open_batches`.

    The crypto libraries hold the GIL, so threads would not help; processes are started with
    "spawn" because the edge process may have TensorFlow's threads running (fork is unsafe).
    """
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


class Ingestor:
    def __init__(
        self, identity: Identity, store: EdgeStore, task_lookup: Callable[[str], TaskSpec | None], workers: int = 0
    ) -> None:
        self.identity = identity
        self.store = store
        self.task_lookup = task_lookup
        self.workers = workers
        self.short = short_id(identity.node_id)
        self.stats = IngestStats()
        self._devices: dict[str, PublicIdentity] = {}
        self._channels: dict[str, Channel] = {}  # device -> channel, derived on its first message
        self._unknown: dict[str, float] = {}  # sender -> monotonic time it was found unregistered
        self._pool: Executor | None = None

    def close(self) -> None:
        """Stop the worker processes, if any were started."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def refresh_devices(self) -> None:
        self._devices = {
            nid: PublicIdentity.from_hex(nid, enc) for nid, enc in self.store.active_devices().items()
        }
        self._channels = {nid: ch for nid, ch in self._channels.items() if self._devices.get(nid) == ch.device}
        self._unknown.clear()

    def _sender(self, node_id: str) -> PublicIdentity | None:
        """A registered device's keys: from memory, else one indexed read (never a table reload)."""
        sender = self._devices.get(node_id)
        if sender is not None:
            return sender
        now = time.monotonic()
        seen = self._unknown.get(node_id)
        if seen is not None and now - seen < UNKNOWN_SENDER_TTL_S:
            return None
        enc = self.store.active_device(node_id)
        if enc is None:
            if len(self._unknown) >= MAX_UNKNOWN_SENDERS:
                self._unknown.clear()
            self._unknown[node_id] = now
            return None
        self._unknown.pop(node_id, None)
        sender = self._devices[node_id] = PublicIdentity(bytes.fromhex(node_id), bytes.fromhex(enc))
        return sender

    def _channel(self, sender: PublicIdentity) -> Channel:
        """The device's channel: one X25519 + HKDF on its first message, then kept."""
        channel = self._channels.get(sender.node_id)
        if channel is None:  # refresh_devices drops the channels of devices whose keys changed
            channel = self._channels[sender.node_id] = Channel.of_edge(self.identity, sender)
        return channel

    def _open(self, items: list[tuple[Sealed, Channel, bytes]]) -> Callable[[int], Opened]:
        """Start opening ``items``; returns a getter that waits only for the chunk it needs.

        Contiguous chunks come back in order, so the caller validates and dedupes the first
        chunk while the workers still open the next ones.
        """
        if self.workers <= 0 or len(items) < 2:
            inline = open_batches(items)
            return inline.__getitem__
        if self._pool is None:
            self._pool = make_pool(self.workers)
        pool = self._pool
        size = max(8, -(-len(items) // (4 * self.workers)))
        edge = (self.identity.public.sign_key, self.identity.public.enc_key)
        plain = [(sealed.raw, ch.device.sign_key, ch.device.enc_key, ch.key, context) for sealed, ch, context in items]
        futures = [pool.submit(_open_in_worker, edge, plain[i : i + size]) for i in range(0, len(plain), size)]
        done: dict[int, list[Opened]] = {}

        def get(i: int) -> Opened:
            k = i // size
            if k not in done:
                try:
                    done[k] = futures[k].result()
                except BrokenExecutor:
                    log.error("ingest worker pool broke (a worker died); opening inline, new pool next drain")
                    self._pool = None
                    done[k] = open_batches(items[k * size : (k + 1) * size])
            return done[k][i - k * size]

        return get

    def drain(self, msgs: Sequence[Incoming]) -> Drained:
        """Process a drained batch of messages and persist the outcome in one transaction.

        Cheap checks first (topic, layout, registered sender), then a byte-identical resend of a
        stored envelope is acknowledged without any crypto (its sha256 matches one that was
        verified); everything else is verified, decrypted and decoded (in the pool when there is
        one), then checked against the task and the stored samples in arrival order.
        """
        admitted: list[tuple[Incoming, Sealed, Channel]] = []
        rejections: list[tuple[str, str, str]] = []
        acks: dict[str, list[int]] = {}
        nacks: dict[str, list[tuple[int, str]]] = {}
        for m in msgs:
            try:
                admitted.append((m, *self._admit(m)))
            except WireError as exc:
                rejections.append((exc.code, exc.detail, m.topic))
        known = self.store.known_envelopes([(s.sender_id, s.seq) for _, s, _ in admitted])
        first_of: dict[str, int] = {}  # digest -> index in to_open (repeats in one drain share the outcome)
        to_open: list[tuple[Sealed, Channel, bytes]] = []
        for m, sealed, channel in admitted:
            if known.get((sealed.sender_id, sealed.seq)) != sealed.digest and sealed.digest not in first_of:
                first_of[sealed.digest] = len(to_open)
                to_open.append((sealed, channel, m.topic.encode()))
        opened = self._open(to_open)
        accepted: list[AcceptedBatch] = []
        this_drain: dict[tuple[str, int], str] = {}
        drain_ids: dict[tuple[str, str], set[int]] = {}  # sample ids accepted in this drain
        for m, sealed, _ in admitted:
            key = (sealed.sender_id, sealed.seq)
            prior = known.get(key) or this_drain.get(key)
            try:
                if prior == sealed.digest:
                    self.stats.duplicates += 1
                    acks.setdefault(sealed.sender_id, []).append(sealed.seq)
                    continue
                got = opened(first_of[sealed.digest])
                if isinstance(got[0], str):
                    raise WireError(*got)
                batch, digest = got
                if prior is not None:
                    raise WireError("seq_reuse", f"seq {sealed.seq} was already used for a different envelope")
                spec = self.task_lookup(batch.task_id)
                if spec is None:
                    raise WireError("unknown_task", f"task {batch.task_id[:12]} is not known here")
                validate_batch(batch, spec)
                receipt = check_batch_receipt(batch, sealed.sender_id, self.identity.node_id)
                owner = (sealed.sender_id, batch.task_id)
                earlier = drain_ids.get(owner)
                ids = batch.sample_ids.tolist() if earlier is not None else None
                if self.store.any_released(sealed.sender_id, batch.task_id, batch.sample_ids) or (
                    earlier is not None and not earlier.isdisjoint(ids)  # type: ignore[arg-type]
                ):
                    raise WireError("sample_reuse", "a sample id was already received from this device")
            except WireError as exc:
                rejections.append((exc.code, exc.detail, m.topic))
                if exc.code not in TRANSIENT_REJECTIONS:
                    nacks.setdefault(sealed.sender_id, []).append((sealed.seq, exc.code))
                continue
            this_drain[key] = sealed.digest
            drain_ids.setdefault(owner, set()).update(batch.sample_ids.tolist() if ids is None else ids)
            accepted.append(
                AcceptedBatch(
                    sealed.sender_id, sealed.seq, sealed.digest, batch.task_id, batch.round, batch.sample_ids, batch.features,
                    batch.labels, digest.hex(), receipt.raw,
                )
            )
            acks.setdefault(sealed.sender_id, []).append(sealed.seq)
        self.store.persist(accepted, rejections)
        self.stats.messages += len(msgs)
        self.stats.drains += 1
        self.stats.accepted += len(accepted)
        self.stats.samples += sum(len(a.sample_ids) for a in accepted)
        for reason, detail, topic in rejections:
            self.stats.rejected[reason] += 1
            log.warning("rejected message on %s: %s: %s", topic, reason, detail)
        return Drained(accepted, acks, rejections, nacks)

    def _admit(self, m: Incoming) -> tuple[Sealed, Channel]:
        """The checks that need no crypto: topic, layout, seq range, a registered sender, a channel
        envelope to this edge. Nothing refused here is answered (nothing is authenticated yet)."""
        parts = m.topic.split("/")
        if len(parts) != 5 or "/".join(parts[:3]) != f"{PREFIX}/feat":
            raise WireError("bad_topic", f"unexpected topic {m.topic}")
        if parts[3] != self.short:
            raise WireError("bad_topic", "feature topic of another edge server")
        sealed = parse(m.payload)
        if sealed.seq >= MAX_SEQ:
            raise WireError("bad_seq", f"seq {sealed.seq} does not fit a signed 64-bit database column")
        if short_id(sealed.sender_id) != parts[4]:
            raise WireError("topic_mismatch", "sender key does not match the topic's device")
        sender = self._sender(sealed.sender_id)
        if sender is None:
            raise WireError("unknown_sender", f"device {sealed.sender_id[:16]} is not registered with this edge")
        if not sealed.encrypted:
            raise WireError("not_encrypted", "feature batches must be channel envelopes (encrypted)")
        channel = self._channel(sender)
        if sealed.recipient_fp != channel.recipient_fp:
            raise WireError("wrong_recipient", "envelope is encrypted to another edge server's key")
        return sealed, channel
