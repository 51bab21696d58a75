"""The public audit as a queued job: POST queues it, GET fetches the result.

The audit re-runs every round of a task from the chain and the content store, which takes
seconds; run inside the request, 20 callers held 20 server threads for up to 16 s each. Here one
worker thread runs the jobs one at a time, at most ``max_pending`` wait (beyond that the caller is
told to come back: 429), a model already queued or running is not queued twice, and the last
``keep_results`` results are kept for fetching.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class AuditJob:
    job_id: str
    model_hash: str
    status: str = "queued"  # queued | running | done
    queued_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    result: dict[str, Any] | None = None

    def view(self) -> dict[str, Any]:
        body: dict[str, Any] = {"job_id": self.job_id, "model_hash": self.model_hash, "status": self.status,
                                "queued_at": self.queued_at, "finished_at": self.finished_at}
        if self.result is not None:
            body.update(self.result)
        return body


class QueueFull(Exception):
    """Too many audits are waiting; the caller should retry after a while."""


class AuditQueue:
    def __init__(self, run: Callable[[str], dict[str, Any]], max_pending: int = 8, keep_results: int = 256) -> None:
        self._run = run
        self.max_pending = max_pending
        self.keep_results = keep_results
        self._jobs: OrderedDict[str, AuditJob] = OrderedDict()
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.completed = 0
        self.refused = 0

    def submit(self, model_hash: str) -> AuditJob:
        """Queue an audit of ``model_hash`` (or return the one already queued or running)."""
        with self._lock:
            for job in self._jobs.values():
                if job.model_hash == model_hash and job.status != "done":
                    return job
            if len(self._pending) >= self.max_pending:
                self.refused += 1
                raise QueueFull(f"{len(self._pending)} audits are waiting; try again later")
            job = AuditJob(secrets.token_hex(16), model_hash)
            self._jobs[job.job_id] = job
            self._pending.append(job.job_id)
            while len(self._jobs) > self.keep_results + self.max_pending:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].status != "done":
                    break
                del self._jobs[oldest]
            if self._worker is None or not self._worker.is_alive():
                # started on demand and gone when the queue is empty: nothing to stop at shutdown
                self._worker = threading.Thread(target=self._drain, name="audit-queue", daemon=True)
                self._worker.start()
            return job

    def get(self, job_id: str) -> AuditJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def wait(self, job_id: str, timeout_s: float) -> AuditJob | None:
        """For tests and the CLI: the job once done (or as it is when the timeout ends)."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if job is None or job.status == "done" or time.monotonic() > deadline:
                return job
            time.sleep(0.05)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._worker = None
                    return
                job = self._jobs[self._pending.pop(0)]
                job.status = "running"
            try:
                result = self._run(job.model_hash)
            except Exception as exc:  # an audit that crashes is a failed audit, not a dead worker
                log.exception("audit of %s failed", job.model_hash[:12])
                result = {"ok": False, "lines": [], "problems": [f"the audit could not run: {type(exc).__name__}: {exc}"]}
            with self._lock:
                job.result, job.status, job.finished_at = result, "done", time.time()
                self.completed += 1
