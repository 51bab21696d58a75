"""The coordinator's Prometheus metrics: a snapshot of its database plus the HTTP intake counters."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import func, select

from crowdfl.metrics import Exposition

from .db import Round, Task, Update
from .service import Coordinator


def render_coordinator_metrics(coord: Coordinator, intake: Counter[tuple[str, str]]) -> str:
    with coord.sessions() as s:
        rounds = {st: int(n) for st, n in s.execute(select(Round.status, func.count()).group_by(Round.status))}
        updates = {st: int(n) for st, n in s.execute(select(Update.status, func.count()).group_by(Update.status))}
        reasons: Counter[str] = Counter()
        for reason, n in s.execute(
            select(Update.reason, func.count()).where(Update.status == "rejected").group_by(Update.reason)
        ):
            reasons[(reason or "invalid").split(":", 1)[0]] += int(n)
        tasks = {st: int(n) for st, n in s.execute(select(Task.status, func.count()).group_by(Task.status))}
        failing = int(s.scalar(select(func.count()).select_from(Round).where(Round.anchor_error.is_not(None))) or 0)
        unsettled = int(s.scalar(select(func.count()).select_from(Round).where(Round.status == "anchored", Round.settled.is_(False))) or 0)
        latest = s.execute(
            select(Round.task_id, Round.accuracy).where(Round.accuracy.is_not(None)).order_by(Round.closed_at.desc()).limit(1)
        ).first()
    x = Exposition()
    x.gauge("crowdfl_coordinator_tasks", "Tasks by status.", {(("status", k),): float(v) for k, v in tasks.items()})
    x.gauge("crowdfl_coordinator_rounds", "Rounds by status (open, closed = waiting to be anchored, anchored).",
            {(("status", k),): float(v) for k, v in rounds.items()})
    x.gauge("crowdfl_coordinator_updates", "Updates recorded in rounds, by status.", {(("status", k),): float(v) for k, v in updates.items()})
    x.gauge("crowdfl_coordinator_updates_rejected", "Recorded updates rejected, by reason.",
            {(("reason", k),): float(v) for k, v in reasons.items()})
    x.counter("crowdfl_coordinator_intake_total", "Update submissions over HTTP since start, by outcome and reason.",
              {(("status", st), ("reason", r)): float(n) for (st, r), n in intake.items()})
    x.counter("crowdfl_coordinator_claims_total",
              "Claims asked of the coordinator (it pays the gas) since start, by outcome (claimed, already_claimed, "
              "not_found, failed, throttled) and reason.",
              {(("outcome", o), ("reason", r)): float(n) for (o, r), n in coord.claims.counts.items()})
    x.gauge("crowdfl_coordinator_anchor_queue", "Rounds closed and not yet anchored on chain.", float(rounds.get("closed", 0)))
    x.gauge("crowdfl_coordinator_anchor_failing", "Rounds whose last anchoring attempt failed (chain down?).", float(failing))
    x.gauge("crowdfl_coordinator_settle_queue", "Anchored rounds whose scores and rewards are not yet on chain.", float(unsettled))
    if latest is not None:
        x.gauge("crowdfl_coordinator_accuracy", "Held-out accuracy of the newest global model.", {(("task", latest[0][:16]),): float(latest[1])})
    return x.render()
