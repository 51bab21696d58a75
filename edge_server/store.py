"""The edge server's durable state, through SQLAlchemy (SQLite by default, PostgreSQL when configured).

Idempotency lives in the schema: an envelope is stored once per (device, seq) and an update once
per (task, round, customer); a sample id once per (device, task) is checked by the one ingest
writer against an index built from the stored batches. Everything a drain of messages changes is
written in one transaction, so a crash leaves either all of it or none; messages are
acknowledged only after that commit, and the devices resend whatever was not acknowledged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from crowdfl import serving


class Base(DeclarativeBase):
    pass


class Blob(LargeBinary):
    """``bytes`` passed to the driver as they are (sqlite3 and psycopg both take bytes for a BLOB /
    bytea): LargeBinary's per-value bind wrapper cost more than the INSERT of a drain's batches."""

    cache_ok = True

    def bind_processor(self, dialect):  # type: ignore[no-untyped-def]
        return None


class DeviceRow(Base):
    __tablename__ = "devices"
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    enc_key: Mapped[str] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class BatchRow(Base):
    """One accepted envelope and its samples, as little-endian blobs (one row, not one per sample).

    A row per sample made every drain thousands of ORM inserts (27 batches/s ingest); the
    per-sample uniqueness that the samples table enforced is now checked by the single ingest
    writer against :class:`_SampleIndex`, built from these rows.
    """

    __tablename__ = "batches"
    __table_args__ = (UniqueConstraint("device", "seq"), Index("ix_batches_device_task", "device", "task_id"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer, index=True)
    samples: Mapped[int] = mapped_column(Integer)
    sample_ids: Mapped[bytes] = mapped_column(Blob)  # uint64 little-endian
    features: Mapped[bytes] = mapped_column(Blob)  # float32 little-endian, samples x feature_dim
    labels: Mapped[bytes] = mapped_column(Blob)  # int8
    received_at: Mapped[float] = mapped_column(Float)
    # sha256 of the batch's encoding without its receipt (crowdfl/receipts.py), and the device's
    # signed receipt that came with it: together the evidence that the device sent these samples
    batch_digest: Mapped[str] = mapped_column(String(64), default="")
    receipt: Mapped[bytes] = mapped_column(Blob, default=b"")


class TaskRow(Base):
    """A task spec the coordinator signed (verified before it is stored), so a restart knows it at once."""

    __tablename__ = "tasks"
    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec: Mapped[bytes] = mapped_column(LargeBinary)  # the encoded TaskSpec


class RoundRow(Base):
    """The latest RoundStart of each task (verified), so a restart can re-schedule training at once."""

    __tablename__ = "rounds"
    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    round: Mapped[int] = mapped_column(Integer)
    start: Mapped[bytes] = mapped_column(LargeBinary)  # the encoded RoundStart


class UpdateRow(Base):
    __tablename__ = "updates"
    __table_args__ = (UniqueConstraint("task_id", "round", "customer"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    customer: Mapped[str] = mapped_column(String(64))
    envelope: Mapped[bytes] = mapped_column(LargeBinary)
    digest: Mapped[str] = mapped_column(String(64))
    submitted: Mapped[bool] = mapped_column(Boolean, default=False)
    train_seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class RejectionRow(Base):
    __tablename__ = "rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reason: Mapped[str] = mapped_column(String(64), index=True)
    detail: Mapped[str] = mapped_column(String(500))
    topic: Mapped[str] = mapped_column(String(200))
    at: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class AcceptedBatch:
    """A validated, decrypted feature batch ready to persist."""

    device: str
    seq: int
    digest: str
    task_id: str
    round: int
    sample_ids: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    batch_digest: str = ""
    receipt: bytes = b""


@dataclass(frozen=True)
class StoredBatch:
    """A stored batch as evidence: enough to rebuild its exact encoding (crowdfl/receipts.py)."""

    device: str
    task_id: str
    round: int
    seq: int
    batch_digest: str
    receipt: bytes
    sample_ids: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    received_at: float


@dataclass(frozen=True)
class CustomerData:
    sample_ids: np.ndarray
    features: np.ndarray
    labels: np.ndarray


def make_engine(url: str) -> Engine:
    return serving.make_engine(url, Base.metadata)

def _hits(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which of ``ids`` are in the sorted array (a binary search each)."""
    if not len(sorted_ids):
        return np.zeros(len(ids), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[pos] == ids


def _merged(sorted_ids: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Two sorted arrays of distinct ids as one; a device's ids mostly grow, so usually an append."""
    if not len(sorted_ids) or not len(new) or new[0] > sorted_ids[-1]:
        return np.concatenate([sorted_ids, new])
    return np.insert(sorted_ids, np.searchsorted(sorted_ids, new), new)


class _SampleIndex:
    """Sample ids already stored, per (device, task), loaded from the batches on first use.

    Only the ingest thread writes batches, so this index and the database agree as long as it is
    extended after a commit (never before: a rolled-back drain must leave no trace). Ids live in a
    large sorted uint64 array plus a small sorted one of recent ids that is merged in now and then,
    so a check costs two binary searches and an insert stays amortised O(batch), all in numpy.
    """

    def __init__(self, load: Callable[[str, str], np.ndarray]) -> None:
        self._load = load
        self._sorted: dict[tuple[str, str], np.ndarray] = {}
        self._recent: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()

    def _ensure(self, key: tuple[str, str]) -> None:
        if key not in self._sorted:
            ids = np.sort(self._load(*key))  # sort + adjacent compare: np.unique would import numpy.ma
            self._sorted[key] = ids[np.concatenate(([True], ids[1:] != ids[:-1]))] if len(ids) else ids
            self._recent[key] = np.zeros(0, np.uint64)

    def seen(self, device: str, task_id: str, ids: np.ndarray) -> np.ndarray:
        """A boolean mask: which of ``ids`` are stored already."""
        key = (device, task_id)
        ids = np.asarray(ids, dtype=np.uint64)
        with self._lock:
            self._ensure(key)
            return _hits(self._sorted[key], ids) | _hits(self._recent[key], ids)

    def any_seen(self, device: str, task_id: str, ids: np.ndarray) -> bool:
        return bool(self.seen(device, task_id, ids).any())

    def extend(self, device: str, task_id: str, new_ids: np.ndarray) -> None:
        key = (device, task_id)
        with self._lock:
            if key not in self._sorted:
                return  # loaded from the database (which has them now) when first needed
            # the new ids were checked against both arrays before they were stored: merging them in
            # is the union (np.union1d would sort and hash everything again)
            recent = _merged(self._recent[key], np.sort(np.asarray(new_ids, dtype=np.uint64)))
            if len(recent) > max(4096, len(self._sorted[key]) // 4):
                self._sorted[key] = _merged(self._sorted[key], recent)
                recent = np.zeros(0, np.uint64)
            self._recent[key] = recent

    def clear(self) -> None:
        with self._lock:
            self._sorted.clear()
            self._recent.clear()


# the batches columns persist() writes, in its row order
_BATCH_COLUMNS = (
    "device", "seq", "digest", "task_id", "round", "samples", "sample_ids", "features", "labels", "received_at",
    "batch_digest", "receipt",
)


def _clean(text: str, limit: int) -> str:
    """PostgreSQL text cannot hold NUL; bound what an outsider can make us store."""
    return text.replace("\x00", "?")[:limit]


class EdgeStore:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._index = _SampleIndex(self._load_sample_ids)
        marker = {"qmark": "?", "format": "%s", "pyformat": "%s"}.get(self.engine.dialect.paramstyle)
        self._insert_batches = (
            f"INSERT INTO {BatchRow.__tablename__} ({', '.join(_BATCH_COLUMNS)}) VALUES ({', '.join([marker] * len(_BATCH_COLUMNS))})"
            if marker else None
        )

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> bool:
        """True when the database answers (health checks)."""
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
            return True
        except SQLAlchemyError:
            return False

    # devices -------------------------------------------------------------------------------
    def register_devices(self, devices: Iterable[tuple[str, str]]) -> None:
        with self.sessions.begin() as s:
            for node_id, enc_key in devices:
                row = s.get(DeviceRow, node_id)
                if row is None:
                    s.add(DeviceRow(node_id=node_id, enc_key=enc_key, active=True))
                else:
                    row.enc_key, row.active = enc_key, True

    def deactivate_device(self, node_id: str) -> None:
        with self.sessions.begin() as s:
            s.execute(update(DeviceRow).where(DeviceRow.node_id == node_id).values(active=False))

    def active_device(self, node_id: str) -> str | None:
        """One active device's encryption key (a primary-key lookup), or None."""
        with self.sessions() as s:
            row = s.get(DeviceRow, node_id)
            return row.enc_key if row is not None and row.active else None

    def active_devices(self) -> dict[str, str]:
        with self.sessions() as s:
            return {r.node_id: r.enc_key for r in s.scalars(select(DeviceRow).where(DeviceRow.active))}

    # tasks and rounds (the coordinator's verified control messages) --------------------------
    def save_task(self, task_id: str, spec: bytes) -> None:
        with self.sessions.begin() as s:
            if s.get(TaskRow, task_id) is None:
                s.add(TaskRow(task_id=task_id, spec=spec))

    def task_specs(self) -> list[bytes]:
        with self.sessions() as s:
            return list(s.scalars(select(TaskRow.spec).order_by(TaskRow.task_id)))

    def save_round(self, task_id: str, round_: int, start: bytes) -> bool:
        """Keep the newest RoundStart of a task; False when an equal or newer one is stored."""
        with self.sessions.begin() as s:
            row = s.get(RoundRow, task_id)
            if row is None:
                s.add(RoundRow(task_id=task_id, round=round_, start=start))
            elif round_ > row.round:
                row.round, row.start = round_, start
            else:
                return False
        return True

    def round_starts(self) -> list[bytes]:
        with self.sessions() as s:
            return list(s.scalars(select(RoundRow.start).order_by(RoundRow.task_id)))

    # ingest --------------------------------------------------------------------------------
    def known_envelopes(self, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """(device, seq) -> digest for those already stored."""
        if not keys:
            return {}
        found: dict[tuple[str, int], str] = {}
        unique = sorted(set(keys))
        with self.sessions() as s:
            for i in range(0, len(unique), 500):
                rows = s.execute(
                    select(BatchRow.device, BatchRow.seq, BatchRow.digest).where(
                        tuple_(BatchRow.device, BatchRow.seq).in_(unique[i : i + 500])
                    )
                ).all()
                found.update({(d, int(q)): g for d, q, g in rows})
        return found

    def _load_sample_ids(self, device: str, task_id: str) -> np.ndarray:
        with self.sessions() as s:
            blobs = s.scalars(select(BatchRow.sample_ids).where(BatchRow.device == device, BatchRow.task_id == task_id)).all()
        return np.frombuffer(b"".join(blobs), dtype="<u8").astype(np.uint64)

    def released_sample_ids(self, device: str, task_id: str, sample_ids: Iterable[int] | np.ndarray) -> set[int]:
        """Which of these sample ids this device already sent for this task."""
        ids = np.asarray(list(sample_ids) if not isinstance(sample_ids, np.ndarray) else sample_ids, dtype=np.uint64)
        return set(int(x) for x in ids[self._index.seen(device, task_id, ids)])

    def any_released(self, device: str, task_id: str, sample_ids: np.ndarray) -> bool:
        """Whether any of these sample ids was already stored for this device and task (the hot path)."""
        return self._index.any_seen(device, task_id, np.asarray(sample_ids, dtype=np.uint64))

    def persist(self, batches: Sequence[AcceptedBatch], rejections: Sequence[tuple[str, str, str]] = ()) -> None:
        """One transaction for a whole drain of the inbox (two bulk INSERTs, one commit)."""
        now = time.time()
        rows = [
            (
                b.device, b.seq, b.digest, b.task_id, b.round, len(b.sample_ids),
                np.ascontiguousarray(b.sample_ids, dtype="<u8").tobytes(),
                np.ascontiguousarray(b.features, dtype="<f4").tobytes(),
                np.ascontiguousarray(b.labels, dtype="i1").tobytes(),
                now, b.batch_digest, b.receipt,
            )
            for b in batches
        ]
        bad = [{"reason": _clean(r, 64), "detail": _clean(d, 500), "topic": _clean(t, 200), "at": now} for r, d, t in rejections]
        if not rows and not bad:
            return
        try:
            with self.sessions.begin() as s:
                if rows:
                    if self._insert_batches is not None:
                        # the driver's executemany with positional rows: half the CPU of a Core
                        # insert, which builds and processes a parameter dict per row
                        s.connection().exec_driver_sql(self._insert_batches, rows)
                    else:
                        s.execute(insert(BatchRow.__table__), [dict(zip(_BATCH_COLUMNS, r)) for r in rows])
                if bad:
                    s.execute(insert(RejectionRow.__table__), bad)
        except Exception:
            self._index.clear()  # reload from the database, which holds the truth
            raise
        for b in batches:
            self._index.extend(b.device, b.task_id, np.asarray(b.sample_ids))

    def customer_data(self, device: str, task_id: str, feature_dim: int, max_round: int | None = None) -> CustomerData:
        """Every sample of a customer for a task (up to a round), ordered by sample id."""
        query = select(BatchRow.sample_ids, BatchRow.features, BatchRow.labels).where(
            BatchRow.device == device, BatchRow.task_id == task_id
        )
        if max_round is not None:
            query = query.where(BatchRow.round <= max_round)
        with self.sessions() as s:
            rows = s.execute(query.order_by(BatchRow.id)).all()
        if not rows:
            return CustomerData(np.zeros(0, np.uint64), np.zeros((0, feature_dim), np.float32), np.zeros(0, np.int64))
        ids = np.frombuffer(b"".join(r[0] for r in rows), dtype="<u8").astype(np.uint64)
        feats = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(ids), feature_dim)
        labels = np.frombuffer(b"".join(r[2] for r in rows), dtype="i1").astype(np.int64)
        order = np.argsort(ids, kind="stable")
        return CustomerData(ids[order], np.ascontiguousarray(feats[order], dtype=np.float32), labels[order])

    def batches(self, device: str, task_id: str, max_round: int | None = None) -> list[StoredBatch]:
        """A device's stored batches for a task (up to a round), in round order."""
        query = select(BatchRow).where(BatchRow.device == device, BatchRow.task_id == task_id)
        if max_round is not None:
            query = query.where(BatchRow.round <= max_round)
        with self.sessions() as s:
            rows = list(s.scalars(query.order_by(BatchRow.round, BatchRow.id)))
            return [
                StoredBatch(
                    r.device, r.task_id, r.round, r.seq, r.batch_digest, r.receipt,
                    np.frombuffer(r.sample_ids, dtype="<u8").astype(np.uint64),
                    np.frombuffer(r.features, dtype="<f4").reshape(r.samples, -1).copy(),
                    np.frombuffer(r.labels, dtype="i1").copy(), r.received_at,
                )
                for r in rows
            ]

    def purge_batches(self, task_id: str) -> int:
        """Drop a task's stored batches (and their evidence) once its retention has passed."""
        with self.sessions.begin() as s:
            n = s.execute(BatchRow.__table__.delete().where(BatchRow.task_id == task_id)).rowcount
        self._index.clear()
        return int(n or 0)

    def rounds_received(self, task_id: str, round_: int) -> set[str]:
        with self.sessions() as s:
            return set(s.scalars(select(BatchRow.device).where(BatchRow.task_id == task_id, BatchRow.round == round_).distinct()))

    def awaiting_training(self, task_id: str, round_: int) -> set[str]:
        """Devices with a batch for this round and no update yet (what a restart must re-schedule)."""
        with self.sessions() as s:
            trained = set(s.scalars(select(UpdateRow.customer).where(UpdateRow.task_id == task_id, UpdateRow.round == round_)))
        return self.rounds_received(task_id, round_) - trained

    def counts(self) -> dict[str, int]:
        """Row counts for status output and metrics."""
        with self.sessions() as s:
            return {
                "batches": int(s.scalar(select(func.count()).select_from(BatchRow)) or 0),
                "samples": int(s.scalar(select(func.coalesce(func.sum(BatchRow.samples), 0))) or 0),
                "updates": int(s.scalar(select(func.count()).select_from(UpdateRow)) or 0),
                "unsubmitted_updates": int(
                    s.scalar(select(func.count()).select_from(UpdateRow).where(UpdateRow.submitted.is_(False))) or 0
                ),
            }

    def rejection_counts(self) -> dict[str, int]:
        with self.sessions() as s:
            return {r: int(n) for r, n in s.execute(select(RejectionRow.reason, func.count()).group_by(RejectionRow.reason))}

    # updates -------------------------------------------------------------------------------
    def has_update(self, task_id: str, round_: int, customer: str) -> bool:
        with self.sessions() as s:
            return s.scalar(
                select(UpdateRow.id).where(UpdateRow.task_id == task_id, UpdateRow.round == round_, UpdateRow.customer == customer)
            ) is not None

    def save_update(self, task_id: str, round_: int, customer: str, envelope: bytes, digest: str, train_seconds: float) -> None:
        with self.sessions.begin() as s:
            s.add(
                UpdateRow(
                    task_id=task_id, round=round_, customer=customer, envelope=envelope, digest=digest,
                    submitted=False, train_seconds=train_seconds, created_at=time.time(),
                )
            )

    def unsubmitted_updates(self) -> list[tuple[int, bytes]]:
        with self.sessions() as s:
            return [(r.id, r.envelope) for r in s.scalars(select(UpdateRow).where(UpdateRow.submitted.is_(False)).order_by(UpdateRow.id))]

    def updates(self) -> list[tuple[str, int, str, str, bool]]:
        """(task, round, customer, digest, submitted) of every update, oldest first."""
        with self.sessions() as s:
            return [
                (r.task_id, r.round, r.customer, r.digest, r.submitted)
                for r in s.scalars(select(UpdateRow).order_by(UpdateRow.id))
            ]

    def mark_submitted(self, update_id: int) -> None:
        with self.sessions.begin() as s:
            s.execute(update(UpdateRow).where(UpdateRow.id == update_id).values(submitted=True))
