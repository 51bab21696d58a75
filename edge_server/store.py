"""The edge server's durable state, through SQLAlchemy (SQLite by default, PostgreSQL when configured).

Idempotency lives in the schema: an envelope is stored once per (device, seq), a sample once per
(device, task, sample id), an update once per (task, round, customer). Everything a batch of
messages changes is written in one transaction, so a crash leaves either all of it or none.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    create_engine,
    event,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


class DeviceRow(Base):
    __tablename__ = "devices"
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    enc_key: Mapped[str] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class EnvelopeRow(Base):
    __tablename__ = "envelopes"
    __table_args__ = (UniqueConstraint("device", "seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device: Mapped[str] = mapped_column(String(64), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    samples: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)


class SampleRow(Base):
    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("device", "task_id", "sample_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device: Mapped[str] = mapped_column(String(64), index=True)
    task_id: Mapped[str] = mapped_column(String(64), index=True)
    sample_id: Mapped[int] = mapped_column(BigInteger)
    round: Mapped[int] = mapped_column(Integer)
    features: Mapped[bytes] = mapped_column(LargeBinary)  # float32 little-endian
    label: Mapped[int] = mapped_column(Integer)


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


@dataclass(frozen=True)
class CustomerData:
    sample_ids: np.ndarray
    features: np.ndarray
    labels: np.ndarray


def make_engine(url: str) -> Engine:
    engine = create_engine(url, future=True, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

    Base.metadata.create_all(engine)
    return engine


class EdgeStore:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

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

    def active_devices(self) -> dict[str, str]:
        with self.sessions() as s:
            return {r.node_id: r.enc_key for r in s.scalars(select(DeviceRow).where(DeviceRow.active))}

    # ingest --------------------------------------------------------------------------------
    def known_envelopes(self, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """(device, seq) -> digest for those already stored."""
        if not keys:
            return {}
        with self.sessions() as s:
            rows = s.execute(
                select(EnvelopeRow.device, EnvelopeRow.seq, EnvelopeRow.digest).where(
                    tuple_(EnvelopeRow.device, EnvelopeRow.seq).in_(list(keys))
                )
            ).all()
        return {(d, int(q)): g for d, q, g in rows}

    def released_sample_ids(self, device: str, task_id: str, sample_ids: Iterable[int]) -> set[int]:
        ids = [int(x) for x in sample_ids]
        with self.sessions() as s:
            rows = s.scalars(
                select(SampleRow.sample_id).where(
                    SampleRow.device == device, SampleRow.task_id == task_id, SampleRow.sample_id.in_(ids)
                )
            ).all()
        return set(int(r) for r in rows)

    def persist(self, batches: Sequence[AcceptedBatch], rejections: Sequence[tuple[str, str, str]] = ()) -> None:
        """One transaction for a whole drain of the inbox."""
        now = time.time()
        with self.sessions.begin() as s:
            for b in batches:
                s.add(
                    EnvelopeRow(
                        device=b.device, seq=b.seq, digest=b.digest, task_id=b.task_id, round=b.round,
                        samples=len(b.sample_ids), received_at=now,
                    )
                )
                feats = np.ascontiguousarray(b.features, dtype="<f4")
                s.add_all(
                    SampleRow(
                        device=b.device, task_id=b.task_id, sample_id=int(sid), round=b.round,
                        features=feats[i].tobytes(), label=int(b.labels[i]),
                    )
                    for i, sid in enumerate(b.sample_ids)
                )
            for reason, detail, topic in rejections:
                s.add(RejectionRow(reason=reason, detail=detail[:500], topic=topic[:200], at=now))

    def customer_data(self, device: str, task_id: str, feature_dim: int) -> CustomerData:
        with self.sessions() as s:
            rows = s.execute(
                select(SampleRow.sample_id, SampleRow.features, SampleRow.label)
                .where(SampleRow.device == device, SampleRow.task_id == task_id)
                .order_by(SampleRow.sample_id)
            ).all()
        if not rows:
            return CustomerData(np.zeros(0, np.uint64), np.zeros((0, feature_dim), np.float32), np.zeros(0, np.int64))
        ids = np.array([r[0] for r in rows], dtype=np.uint64)
        feats = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), feature_dim)
        labels = np.array([r[2] for r in rows], dtype=np.int64)
        return CustomerData(ids, feats.copy(), labels)

    def rounds_received(self, task_id: str, round_: int) -> set[str]:
        with self.sessions() as s:
            return set(
                s.scalars(select(EnvelopeRow.device).where(EnvelopeRow.task_id == task_id, EnvelopeRow.round == round_))
            )

    def rejection_counts(self) -> dict[str, int]:
        from sqlalchemy import func

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

    def mark_submitted(self, update_id: int) -> None:
        with self.sessions.begin() as s:
            s.execute(update(UpdateRow).where(UpdateRow.id == update_id).values(submitted=True))
