"""The agent's durable state: the privacy ledger, the outgoing spool and the sequence counter.

They share one SQLite file so that a release is one transaction: the samples are marked as
released, the budget they spend is added to every hour and day of the usage log they read
(``hour_budget``, ``day_budget``; checked against the owner's caps in the same transaction), the
next sequence number is taken and the sealed envelope is put in the spool, or none of it happens. After a power cut either nothing left the device (and the samples are still
unreleased) or the envelope is in the spool and is resent, byte for byte, until the edge server
acknowledges it. A sample is never noised twice, so the noise cannot be averaged away.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crowdfl.errors import PrivacyError

from .privacy import HourCaps, Spend, over_caps

_SCHEMA = """
CREATE TABLE IF NOT EXISTS released (
    sample_id INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    epsilon REAL NOT NULL,
    seq INTEGER NOT NULL,
    released_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS receipts (
    task_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    batch_digest BLOB NOT NULL,
    samples INTEGER NOT NULL,
    receipt BLOB NOT NULL,
    PRIMARY KEY (task_id, round)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS released_round ON released (task_id, round);
CREATE TABLE IF NOT EXISTS hour_budget (hour INTEGER PRIMARY KEY, epsilon REAL NOT NULL);
CREATE TABLE IF NOT EXISTS day_budget (day INTEGER PRIMARY KEY, epsilon REAL NOT NULL);
"""


class SpoolFull(PrivacyError):
    """The outgoing spool reached its bound; nothing new is released until the edge acknowledges."""


@dataclass(frozen=True)
class BudgetReport:
    samples_released: int
    max_epsilon_per_sample: float
    total_epsilon: float  # sum over released samples (each sample's budget is independent)
    by_task: dict[str, tuple[int, float]]


@dataclass(frozen=True)
class HourBudgetReport:
    """What the usage log's hours and days carry, over every release (agent.privacy.sample_spend)."""

    hours_accounted: int
    max_epsilon_per_hour: float
    max_epsilon_per_day: float
    busiest_hour: int | None  # unix hour
    busiest_day: int | None  # unix day (hour // 24)


@dataclass(frozen=True)
class Spooled:
    seq: int
    topic: str
    payload: bytes
    attempts: int


def first_seq() -> int:
    """Where a new state database starts counting: the clock in microseconds.

    The edge keeps (device, seq) forever and refuses a seq it has seen with other bytes. A device
    whose state database is lost (SD card replaced, wiped) must not start at 1 again, or the edge
    would refuse everything it sends as ``seq_reuse``, for ever. Starting from the clock puts the
    new numbers above every old one unless more than a million envelopes a second were sent, or
    the clock went back past the old database's creation (then the edge's rejections say so).
    """
    return time.time_ns() // 1000


class AgentState:
    def __init__(self, path: Path | str, max_spool_bytes: int = 64 * 1024 * 1024) -> None:
        self.path = str(path)
        self.max_spool_bytes = max_spool_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a release must survive a power cut
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def unreleased(self, sample_ids: np.ndarray) -> np.ndarray:
        """The subset of ``sample_ids`` never released (order kept)."""
        if len(sample_ids) == 0:
            return sample_ids
        with self._lock:
            rows = self._db.execute(
                "SELECT sample_id FROM released WHERE sample_id BETWEEN ? AND ?",
                (int(sample_ids.min()), int(sample_ids.max())),
            ).fetchall()
        done = np.array([r[0] for r in rows], dtype=np.uint64)
        return sample_ids[~np.isin(sample_ids, done)]

    def released_in_round(self, task_id: str, round_: int) -> int:
        """How many samples this device released for a round (after a restart: do not contribute twice)."""
        with self._lock:
            return int(self._db.execute(
                "SELECT COUNT(*) FROM released WHERE task_id = ? AND round = ?", (task_id, int(round_))
            ).fetchone()[0])

    def spool_bytes(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM spool").fetchone()[0])

    def release(
        self,
        task_id: str,
        round_: int,
        sample_ids: Iterable[int],
        epsilon: float,
        topic: str,
        seal: Callable[[int], bytes],
        spend: Spend | None = None,
        caps: HourCaps | None = None,
        receipt: tuple[bytes, bytes] | None = None,
    ) -> int:
        """Atomically record the release, add ``spend`` to the hours and days it reads (refusing
        with ``PrivacyError("budget_exceeded")`` if that would pass ``caps``), take a sequence
        number and spool ``seal(seq)``.

        ``receipt`` is (batch digest, signed receipt) of the round, kept for ``crowdfl-agent verify``
        and for the next round's receipt (which covers every batch so far)."""
        ids = [int(s) for s in sample_ids]
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                used = self._db.execute(
                    f"SELECT COUNT(*) FROM released WHERE sample_id IN ({','.join('?' * len(ids))})", ids
                ).fetchone()[0] if ids else 0
                if used:
                    raise PrivacyError("already_released", f"{used} of {len(ids)} samples were released before")
                if spend is not None:
                    self._charge(spend, caps or HourCaps())
                size = int(self._db.execute("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM spool").fetchone()[0])
                if size >= self.max_spool_bytes:
                    raise SpoolFull("spool_full", f"outgoing spool holds {size} bytes (limit {self.max_spool_bytes})")
                row = self._db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()
                seq = row[0] + 1 if row else first_seq()
                self._db.execute("INSERT OR REPLACE INTO counters VALUES ('seq', ?)", (seq,))
                self._db.executemany(
                    "INSERT INTO released VALUES (?, ?, ?, ?, ?, ?)",
                    [(s, task_id, round_, float(epsilon), seq, now) for s in ids],
                )
                if receipt is not None:
                    self._db.execute(
                        "INSERT INTO receipts VALUES (?, ?, ?, ?, ?)", (task_id, int(round_), receipt[0], len(ids), receipt[1])
                    )
                payload = seal(seq)
                self._db.execute("INSERT INTO spool (seq, topic, payload, created_at) VALUES (?, ?, ?, ?)", (seq, topic, payload, now))
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite rolls a transaction back by itself on some errors (SQLITE_FULL: the disk is
                # full); a second ROLLBACK would then raise and hide the real cause
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return seq

    def _spent_locked(self, hours: Iterable[int], days: Iterable[int]) -> Spend:
        hs, ds = sorted(set(hours)), sorted(set(days))
        got_h = self._db.execute(
            "SELECT hour, epsilon FROM hour_budget WHERE hour BETWEEN ? AND ?", (hs[0], hs[-1])
        ).fetchall() if hs else []
        got_d = self._db.execute(
            "SELECT day, epsilon FROM day_budget WHERE day BETWEEN ? AND ?", (ds[0], ds[-1])
        ).fetchall() if ds else []
        return Spend({int(h): float(e) for h, e in got_h}, {int(d): float(e) for d, e in got_d})

    def _charge(self, spend: Spend, caps: HourCaps) -> None:
        """Inside a release's transaction: check the caps, then add the spend."""
        why = over_caps(self._spent_locked(spend.hours, spend.days), spend, caps)
        if why is not None:
            raise PrivacyError("budget_exceeded", why)
        self._db.executemany(
            "INSERT INTO hour_budget VALUES (?, ?) ON CONFLICT(hour) DO UPDATE SET epsilon = epsilon + excluded.epsilon",
            [(int(h), float(e)) for h, e in spend.hours.items()],
        )
        self._db.executemany(
            "INSERT INTO day_budget VALUES (?, ?) ON CONFLICT(day) DO UPDATE SET epsilon = epsilon + excluded.epsilon",
            [(int(d), float(e)) for d, e in spend.days.items()],
        )

    def spent(self, hours: Iterable[int], days: Iterable[int]) -> Spend:
        """The budget already spent on these hours and days of the usage log."""
        with self._lock:
            return self._spent_locked(hours, days)

    def spent_epsilon(self) -> float:
        """The largest epsilon any one hour of this household's usage log carries, over every
        release so far: the per-hour guarantee the device has given (0.0 before any release)."""
        with self._lock:
            return float(self._db.execute("SELECT COALESCE(MAX(epsilon), 0.0) FROM hour_budget").fetchone()[0])

    def hour_budget(self) -> HourBudgetReport:
        with self._lock:
            n, max_h = self._db.execute("SELECT COUNT(*), COALESCE(MAX(epsilon), 0.0) FROM hour_budget").fetchone()
            max_d = self._db.execute("SELECT COALESCE(MAX(epsilon), 0.0) FROM day_budget").fetchone()[0]
            bh = self._db.execute("SELECT hour FROM hour_budget ORDER BY epsilon DESC, hour LIMIT 1").fetchone()
            bd = self._db.execute("SELECT day FROM day_budget ORDER BY epsilon DESC, day LIMIT 1").fetchone()
        return HourBudgetReport(int(n), float(max_h), float(max_d), int(bh[0]) if bh else None, int(bd[0]) if bd else None)

    def batch_digests(self, task_id: str) -> list[tuple[bytes, int]]:
        """(digest, samples) of every batch released to a task with a receipt."""
        with self._lock:
            rows = self._db.execute("SELECT batch_digest, samples FROM receipts WHERE task_id = ? ORDER BY round", (task_id,)).fetchall()
        return [(bytes(r[0]), int(r[1])) for r in rows]

    def receipts(self) -> list[tuple[str, int, bytes]]:
        """(task, round, signed receipt) of every round this device contributed to."""
        with self._lock:
            rows = self._db.execute("SELECT task_id, round, receipt FROM receipts ORDER BY task_id, round").fetchall()
        return [(r[0], int(r[1]), bytes(r[2])) for r in rows]

    def pending(self, limit: int = 100) -> list[Spooled]:
        with self._lock:
            rows = self._db.execute("SELECT seq, topic, payload, attempts FROM spool ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [Spooled(int(r[0]), r[1], bytes(r[2]), int(r[3])) for r in rows]

    def mark_attempt(self, seq: int) -> None:
        with self._lock:
            self._db.execute("UPDATE spool SET attempts = attempts + 1 WHERE seq = ?", (seq,))

    def acknowledge(self, seqs: Iterable[int]) -> int:
        seqs = [int(s) for s in seqs]
        if not seqs:
            return 0
        with self._lock:
            before = self._db.total_changes
            self._db.executemany("DELETE FROM spool WHERE seq = ?", [(s,) for s in seqs])
            return self._db.total_changes - before

    def budget(self) -> BudgetReport:
        with self._lock:
            rows = self._db.execute(
                "SELECT task_id, COUNT(*), SUM(epsilon), MAX(epsilon) FROM released GROUP BY task_id"
            ).fetchall()
        by_task = {r[0]: (int(r[1]), float(r[2])) for r in rows}
        return BudgetReport(
            samples_released=sum(v[0] for v in by_task.values()),
            max_epsilon_per_sample=max((float(r[3]) for r in rows), default=0.0),
            total_epsilon=sum(v[1] for v in by_task.values()),
            by_task=by_task,
        )
