"""The coordinator's state in SQLAlchemy (SQLite by default, PostgreSQL when configured).

A round's close is one transaction (its statuses, the manifest and proofs, the next round), so a
coordinator killed at any point resumes from a consistent state; anchoring reads what is closed
and not yet anchored.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from crowdfl import serving


class Base(DeclarativeBase):
    pass


class Participant(Base):
    __tablename__ = "participants"
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(8))  # device | edge
    enc_key: Mapped[str] = mapped_column(String(64))
    edge: Mapped[str | None] = mapped_column(String(64), nullable=True)  # a device's edge server
    payout: Mapped[str | None] = mapped_column(String(42), nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # whether the chain's registry agrees with ``active`` (registration or removal still queued)
    on_chain: Mapped[bool] = mapped_column(Boolean, default=False)
    registered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    removed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Task(Base):
    __tablename__ = "tasks"
    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec_hash: Mapped[str] = mapped_column(String(64))
    spec: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running | done
    on_chain: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    reward_wei: Mapped[str] = mapped_column(String(80), default="0")  # decimal; uint256 overflows SQL ints


class Round(Base):
    __tablename__ = "rounds"
    task_id: Mapped[str] = mapped_column(String(64), ForeignKey("tasks.task_id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # open | closed | anchored
    base_model_hash: Mapped[str] = mapped_column(String(64))
    selected: Mapped[str] = mapped_column(Text)  # JSON list of node ids
    eligible: Mapped[str] = mapped_column(Text, default="[]")  # JSON: active devices when it opened
    opened_at: Mapped[float] = mapped_column(Float)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    model_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    manifest_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    merkle_root: Mapped[str | None] = mapped_column(String(64), nullable=True)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    tx_hash: Mapped[str | None] = mapped_column(String(66), nullable=True)
    block_number: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    gas_used: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    anchor_attempts: Mapped[int] = mapped_column(Integer, default=0)
    anchor_error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    ledger_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)  # scores, reputation, rewards
    # after the anchor: the round's scores (setScores) and rewards (credit) mirrored on chain
    settled: Mapped[bool] = mapped_column(Boolean, default=False)
    scores_tx: Mapped[str | None] = mapped_column(String(66), nullable=True)
    scores_block: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    credit_tx: Mapped[str | None] = mapped_column(String(66), nullable=True)
    credit_block: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    settle_note: Mapped[str | None] = mapped_column(String(500), nullable=True)
    settle_gas: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # the settleRound transaction's gas


class Update(Base):
    __tablename__ = "updates"
    __table_args__ = (UniqueConstraint("task_id", "round", "customer"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(64), index=True)
    round: Mapped[int] = mapped_column(Integer)
    customer: Mapped[str] = mapped_column(String(64))
    edge: Mapped[str] = mapped_column(String(64))
    update_hash: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16))  # received | accepted | rejected
    reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    num_samples: Mapped[int] = mapped_column(Integer, default=0)
    received_at: Mapped[float] = mapped_column(Float)
    proof: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON list of hex Merkle siblings


class Reputation(Base):
    """A customer's standing in a task after each round (history kept for the dashboard)."""

    __tablename__ = "reputation"
    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    customer: Mapped[str] = mapped_column(String(64), primary_key=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)  # None: not scored this round
    reputation: Mapped[float] = mapped_column(Float)
    reward_wei: Mapped[str] = mapped_column(String(80), default="0")
    selected: Mapped[bool] = mapped_column(Boolean, default=False)


def make_engine(url: str) -> Engine:
    return serving.make_engine(url, Base.metadata)


def make_sessions(url: str) -> sessionmaker:  # type: ignore[type-arg]
    return sessionmaker(make_engine(url), expire_on_commit=False)
