"""A round's ledger: who was eligible and selected, each update's score, reputations, rewards.

Pure functions, no I/O. The ledger is canonical JSON kept in the content store; its hash is part
of the round's manifest (so it is anchored with the round), and the audit rebuilds it from the
previous round's ledger and the round's updates. Floats are written with ``repr`` (exact round
trip), so a rebuilt ledger is byte-identical or wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from crowdfl.messages import ModelUpdate

from .aggregation import AggregationResult
from .reputation import (
    ReputationConfig,
    TrustReputationConfig,
    contribution_rewards,
    score_round,
    select,
    split_rewards,
    standing,
    trust_round_scores,
    update_reputations,
    update_trust_reputations,
)

LEDGER_KIND = "crowdfl-round-ledger"
LEDGER_VERSION = 1
# Invalid updates that say something about the customer's data (a wrong base model or a closed
# round may be an honest delay, so those are not scored).
PENALISED = ("bad_weights", "bad_samples")


@dataclass(frozen=True)
class LedgerPolicy:
    """Reputation knobs plus the round size; recorded in every ledger."""

    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    max_participants: int = 0  # 0: every eligible customer the reputation rules allow
    # reputation from the defences' trust signal (coordinator/defence.py), used for defended rounds
    trust: TrustReputationConfig = field(default_factory=TrustReputationConfig)

    @property
    def floor(self) -> float:
        """The selection floor: the trust reputation's (the score every defended round writes)."""
        return self.trust.floor

    def __post_init__(self) -> None:
        if isinstance(self.max_participants, bool) or not isinstance(self.max_participants, int) or self.max_participants < 0:
            raise ValueError(f"max_participants must be an integer >= 0; got {self.max_participants!r}")

    def to_json(self) -> dict[str, Any]:
        return {"max_participants": self.max_participants, **asdict(self.reputation), "trust": asdict(self.trust)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LedgerPolicy:
        rep = {k: v for k, v in data.items() if k not in ("max_participants", "trust")}
        trust = TrustReputationConfig(**data["trust"]) if isinstance(data.get("trust"), dict) else TrustReputationConfig()
        return cls(ReputationConfig(**rep), int(data.get("max_participants", 0)), trust)


def selection_seed(task_id: str, round_: int) -> int:
    """Public, per-round seed: anyone can redo the draw, nobody can steer it after the task is out."""
    return int.from_bytes(hashlib.sha256(f"crowdfl-select:{task_id}:{round_}".encode()).digest()[:8], "big")


def select_customers(
    policy: LedgerPolicy, reputations: Mapping[str, float], eligible: Sequence[str], task_id: str, round_: int
) -> tuple[str, ...]:
    """The round's customers among the eligible ones (see reputation.select)."""
    k = policy.max_participants or len(eligible)
    rng = np.random.default_rng(selection_seed(task_id, round_))
    return select(reputations, sorted(eligible), k, policy.floor, policy.reputation.newcomer_slots(k), rng)


def round_pool(reward_wei: int, rounds: int, round_: int) -> int:
    """The task's reward spread evenly over its rounds; the last round also gets the remainder."""
    share = reward_wei // rounds
    return share + (reward_wei - share * rounds if round_ == rounds else 0)


def round_ledger(
    policy: LedgerPolicy,
    task_id: str,
    round_: int,
    eligible: Sequence[str],
    selected: Sequence[str],
    reputation_before: Mapping[str, float],
    ordered: Sequence[tuple[str, ModelUpdate]],
    result: AggregationResult,
    invalid: Sequence[tuple[str, str]],
    pool_wei: int,
    payees: Collection[str],
) -> dict[str, Any]:
    """Score the round, fold the scores into the reputations and split the round's pool.

    ``ordered`` is the aggregation's input (hash, update) in its order; ``invalid`` is
    (customer, reason) of the updates refused before aggregation; ``payees`` are the customers
    with a payout address (only they can be credited on chain).
    """
    customers = [u.customer for _, u in ordered]
    defended = "defence" in result.params
    if defended:  # scores from the trust signal (coordinator/defence.py), recorded in the round's params
        p = result.params
        if [float(x) for x in p["standing"]] != standing(reputation_before, customers, policy.trust):
            raise ValueError("the round's standings do not follow from the reputations before it")
        scores = trust_round_scores(customers, p["cosine"], p["penalty"], policy.trust)
    else:
        scores = score_round(customers, [list(u.weights) for _, u in ordered], result, policy.reputation)
    chosen = set(selected)
    for customer, reason in invalid:
        if customer in chosen and customer not in scores and reason.split(":", 1)[0] in PENALISED:
            scores[customer] = 0.0
    if defended:
        after = update_trust_reputations(reputation_before, scores, policy.trust)
        # pay by the round's trust score x standing x samples, whether or not the guard published
        # the model: the customer's work was useful or not on its own merits. The score, not the
        # raw cosine, because it is relative to the round's honest cohort: an update that only
        # looks like work (noise around the mean, a weakly aligned flip) earns little or nothing.
        paid = [i for i, (_, u) in enumerate(ordered) if u.customer in payees]
        rewards = contribution_rewards(
            pool_wei,
            {customers[i]: float(scores[customers[i]]) for i in paid},
            {customers[i]: float(result.params["standing"][i]) for i in paid},
            {customers[i]: ordered[i][1].num_samples for i in paid},
        ) if paid else {}
    else:
        after = update_reputations(reputation_before, scores, policy.reputation)
        kept = set(result.kept)
        contributions = {u.customer: u.num_samples for i, (_, u) in enumerate(ordered) if i in kept and u.customer in payees}
        try:
            rewards = split_rewards(pool_wei, after, contributions) if contributions else {}
        except ValueError:  # nobody with a positive weight: the pool stays on chain for later rounds
            rewards = {c: 0 for c in contributions}
    return {
        "kind": LEDGER_KIND,
        "version": LEDGER_VERSION,
        "task_id": task_id,
        "round": round_,
        "policy": policy.to_json(),
        "selection_seed": selection_seed(task_id, round_),
        "eligible": sorted(eligible),
        "selected": sorted(selected),
        "reputation_before": {c: float(reputation_before[c]) for c in sorted(reputation_before)},
        "scores": {c: float(scores[c]) for c in sorted(scores)},
        "reputation_after": {c: float(after[c]) for c in sorted(after)},
        "pool_wei": str(pool_wei),
        "rewards": {c: str(rewards[c]) for c in sorted(rewards)},
    }


def ledger_bytes(ledger: Mapping[str, Any]) -> bytes:
    return json.dumps(ledger, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def parse_ledger(data: bytes) -> dict[str, Any]:
    """Decode and shape-check a ledger read from a store (external input for the audit)."""
    try:
        ledger = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"ledger is not JSON: {exc}") from None
    if not isinstance(ledger, dict) or ledger.get("kind") != LEDGER_KIND or ledger.get("version") != LEDGER_VERSION:
        raise ValueError("not a crowdfl round ledger of a known version")
    for key in ("eligible", "selected"):
        if not isinstance(ledger.get(key), list) or not all(isinstance(x, str) for x in ledger[key]):
            raise ValueError(f"ledger.{key} must be a list of node ids")
    for key in ("reputation_before", "scores", "reputation_after"):
        values = ledger.get(key)
        if not isinstance(values, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()
        ):
            raise ValueError(f"ledger.{key} must map node ids to numbers")
    rewards = ledger.get("rewards")
    if not isinstance(rewards, dict) or not all(isinstance(v, str) and v.isdigit() for v in rewards.values()):
        raise ValueError("ledger.rewards must map node ids to decimal strings")
    if not isinstance(ledger.get("pool_wei"), str) or not ledger["pool_wei"].isdigit():
        raise ValueError("ledger.pool_wei must be a decimal string")
    if not isinstance(ledger.get("policy"), dict):
        raise ValueError("ledger.policy must be an object")
    return ledger


def chain_scores(ledger: Mapping[str, Any]) -> dict[str, float]:
    """What is mirrored on chain for the round: the new reputation of every customer scored in it."""
    return {c: float(ledger["reputation_after"][c]) for c in sorted(ledger["scores"])}


def chain_credits(ledger: Mapping[str, Any]) -> dict[str, int]:
    return {c: int(v) for c, v in sorted(ledger["rewards"].items()) if int(v) > 0}
