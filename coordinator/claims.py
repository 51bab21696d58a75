"""Claims sent on a customer's behalf: the coordinator signs the transaction and pays its gas, the
contract pays the customer's registered payout (only a true settlement leaf, only once).

Anyone may ask, so the gas is rationed: one claim per customer and round in flight at a time; after
a failed transaction (reverted, or the chain unreachable) the same claim waits ``retry_after_s``;
and at most ``per_minute`` transactions are sent for all customers together. A refused request is
a ``ClaimThrottled`` (HTTP 429 with Retry-After); every outcome is counted for /metrics.
A claim the chain already has is answered from the chain (no transaction, not rationed).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .chain import ChainError
from .contracts import CrowdContracts

log = logging.getLogger(__name__)

WINDOW_S = 60.0


@dataclass(frozen=True)
class ClaimLimits:
    per_minute: int = 30  # claim transactions sent, all customers together; 0: none (customers send their own)
    retry_after_s: float = 60.0  # after a failed claim transaction, the same customer and round wait this long (s)

    def __post_init__(self) -> None:
        if self.per_minute < 0 or not self.retry_after_s >= 0:
            raise ValueError("per_minute and retry_after_s must be >= 0")


class ClaimThrottled(Exception):
    """A claim the coordinator will not send now; ``reason`` is in_progress | recent_failure | rate."""

    def __init__(self, reason: str, detail: str, retry_after_s: float) -> None:
        super().__init__(detail)
        self.reason, self.retry_after_s = reason, retry_after_s

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


class ClaimSender:
    def __init__(
        self,
        contracts: CrowdContracts,
        claim_proof: Callable[[str, int, str], dict[str, Any] | None],
        limits: ClaimLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.contracts = contracts
        self.claim_proof = claim_proof  # the views': the leaf and proof the database settled
        self.limits = limits or ClaimLimits()
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: set[tuple[str, int, str]] = set()
        self._failed_at: dict[tuple[str, int, str], float] = {}
        self._sent: deque[float] = deque()  # times of the transactions sent in the last WINDOW_S
        # (outcome, reason) -> requests: claimed | already_claimed | not_found | failed | throttled
        self.counts: Counter[tuple[str, str]] = Counter()

    def submit_claim(self, task_id: str, round_: int, customer: str) -> dict[str, Any]:
        """Send a customer's claim on its behalf; KeyError when nothing is settled for it,
        ChainError when the transaction fails, ClaimThrottled when it is not sent now."""
        key = (task_id, round_, customer)
        try:
            self._admit(key)
        except ClaimThrottled as exc:
            self._refused(key, exc)
            raise
        try:
            result = self._send(task_id, round_, customer)
        except ClaimThrottled as exc:
            self._refused(key, exc)
            raise
        except KeyError:
            self._count("not_found")
            raise
        except ChainError as exc:
            with self._lock:
                self._failed_at[key] = self._clock()
            self._count("failed", "reverted" if exc.reverted else "chain_unavailable")
            raise
        finally:
            with self._lock:
                self._in_flight.discard(key)
        self._count(result["status"])
        return result

    def _send(self, task_id: str, round_: int, customer: str) -> dict[str, Any]:
        tid, key = bytes.fromhex(task_id), bytes.fromhex(customer)
        if self.contracts.is_claimed(tid, round_, key):
            return {"status": "already_claimed"}
        leaf = self.claim_proof(task_id, round_, customer)
        if leaf is None:
            raise KeyError(customer)
        self._take_slot()
        receipt = self.contracts.claim(
            tid, round_, key, leaf["reputation_milli"], int(leaf["amount_wei"]), [bytes.fromhex(p) for p in leaf["proof"]]
        )
        return {"status": "claimed", "tx_hash": "0x" + receipt.tx_hash.hex(), "amount_wei": leaf["amount_wei"]}

    def _admit(self, key: tuple[str, int, str]) -> None:
        with self._lock:
            now = self._clock()
            for k in [k for k, t in self._failed_at.items() if now - t >= self.limits.retry_after_s]:
                del self._failed_at[k]
            if key in self._in_flight:
                raise ClaimThrottled("in_progress", "a claim for this customer and round is being sent", 1.0)
            if key in self._failed_at:
                wait = self.limits.retry_after_s - (now - self._failed_at[key])
                raise ClaimThrottled(
                    "recent_failure", f"the last claim for this customer and round failed; try again in {math.ceil(wait)} s", wait
                )
            self._in_flight.add(key)

    def _take_slot(self) -> None:
        with self._lock:
            now = self._clock()
            while self._sent and now - self._sent[0] >= WINDOW_S:
                self._sent.popleft()
            if len(self._sent) >= self.limits.per_minute:
                wait = WINDOW_S - (now - self._sent[0]) if self._sent else WINDOW_S
                raise ClaimThrottled(
                    "rate", f"the coordinator sends at most {self.limits.per_minute} claims a minute; try again later", wait
                )
            self._sent.append(now)

    def _refused(self, key: tuple[str, int, str], exc: ClaimThrottled) -> None:
        log.warning("claim for %s in task %s round %d refused: %s", key[2][:12], key[0][:12], key[1], exc)
        self._count("throttled", exc.reason)

    def _count(self, outcome: str, reason: str = "") -> None:
        with self._lock:
            self.counts[(outcome, reason)] += 1
