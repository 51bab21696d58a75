"""The round loop of a task, in process: release, edge training, attacks, aggregation, reputation.

What the services do over MQTT and HTTP is reduced to function calls on the same code: each
selected customer releases `samples_per_round` fresh samples (noised once, on the device, by
`agent.privacy.privatise_features`), its edge trains the head on everything that customer has
released so far, the coordinator checks the update (`crowdfl.backmodel.check_back_weights`),
aggregates with `coordinator.aggregation.aggregate` and `coordinator.rounds.rule_params`, scores
the round and folds it into reputations (`coordinator.reputation`), and selects the next round's
customers with `coordinator.reputation.select` when reputation selection is on.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from coordinator.aggregation import aggregate
from coordinator.reputation import ReputationConfig, score_round, select, update_reputations
from coordinator.rounds import rule_params
from crowdfl.backmodel import accuracy, check_back_weights
from crowdfl.messages import TaskSpec
from edge_server.store import CustomerData

Trainer = Callable[[Sequence[np.ndarray], CustomerData, TaskSpec, int], list[np.ndarray]]

# The coordinator's defaults (coordinator/service.py Coordinator.__init__).
BYZANTINE_FRACTION = 0.2
TRIM_BETA = 0.1


class Attack(enum.StrEnum):
    NONE = "none"
    SIGN_FLIP = "sign_flip"  # sends g - delta
    SCALE = "scale_x10"  # sends g + 10 delta
    LABEL_FLIP = "label_flip"  # trains honestly on labels c - 1 - y
    NOISE = "random_noise"  # sends g + N(0, 1) per parameter
    COLLUDE = "colluding"  # every attacker sends the same g - 3 mean(delta of the group)


@dataclass(frozen=True)
class Pool:
    """Every customer's released samples, noisy, in the order the device releases them."""

    ids: tuple[str, ...]
    features: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class FedConfig:
    rounds: int
    samples_per_round: int
    rule: str = "fedavg"
    reputation: bool = False
    byzantine_fraction: float = BYZANTINE_FRACTION
    trim_beta: float = TRIM_BETA
    attack: Attack = Attack.NONE
    malicious_fraction: float = 0.0


@dataclass
class FedRun:
    config: FedConfig
    accuracy: list[float] = field(default_factory=list)  # after each round, on the evaluation set
    validation: list[float] = field(default_factory=list)  # the same on the validation set, if given
    attacker_rep_max: list[float] = field(default_factory=list)
    honest_rep_min: list[float] = field(default_factory=list)
    attackers_selected: list[int] = field(default_factory=list)
    honest_selected: list[int] = field(default_factory=list)
    attackers_kept: list[int] = field(default_factory=list)  # by Multi-Krum; all for the other rules
    rounds_to_floor: int | None = None  # first round after which every attacker is below the floor
    weights: list[np.ndarray] = field(default_factory=list)

    @property
    def final(self) -> float:
        return self.accuracy[-1]


def malicious_ids(pool: Pool, fraction: float, seed: int) -> frozenset[str]:
    count = int(round(fraction * len(pool.ids)))
    order = np.random.default_rng([seed, 99]).permutation(len(pool.ids))
    return frozenset(pool.ids[int(i)] for i in order[:count])


def run_federation(
    spec: TaskSpec,
    initial: Sequence[np.ndarray],
    pool: Pool,
    evaluation: tuple[np.ndarray, np.ndarray],
    config: FedConfig,
    trainer: Trainer,
    seed: int,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> FedRun:
    """Run `config.rounds` rounds; accuracy is measured on `evaluation` (clean features, labels)."""
    rep_cfg = ReputationConfig()
    bad = malicious_ids(pool, config.malicious_fraction, seed) if config.attack is not Attack.NONE else frozenset()
    index = {cid: i for i, cid in enumerate(pool.ids)}
    released = dict.fromkeys(pool.ids, 0)
    reps: dict[str, float] = {}
    global_w = [np.asarray(w, np.float32) for w in initial]
    select_rng = np.random.default_rng([seed, 7])
    noise_rng = np.random.default_rng([seed, 11])
    run = FedRun(config)
    classes = spec.num_classes
    for rnd in range(1, config.rounds + 1):
        candidates = [c for c in pool.ids if released[c] < len(pool.labels[index[c]])]
        if config.reputation:
            k = len(candidates)
            chosen = select(reps, candidates, k, rep_cfg.floor, rep_cfg.newcomer_slots(k), select_rng)
        else:
            chosen = tuple(sorted(candidates))
        if not chosen:
            break
        locals_: dict[str, list[np.ndarray]] = {}
        counts: dict[str, int] = {}
        for cid in chosen:
            i = index[cid]
            released[cid] = min(released[cid] + config.samples_per_round, len(pool.labels[i]))
            n = released[cid]
            labels = pool.labels[i][:n].astype(np.int64)
            if cid in bad and config.attack is Attack.LABEL_FLIP:
                labels = classes - 1 - labels
            data = CustomerData(np.arange(n, dtype=np.uint64), pool.features[i][:n], labels)
            train_seed = int(np.random.SeedSequence([seed, rnd, i]).generate_state(1)[0] % 2**31)
            locals_[cid] = trainer(global_w, data, spec, train_seed)
            counts[cid] = n
        updates = _apply_attack(config.attack, global_w, locals_, bad, noise_rng)
        for cid in chosen:
            check_back_weights(updates[cid], spec)  # what coordinator.rounds.check_update does
        ordered = list(chosen)  # sorted by id, as the coordinator orders candidates
        params = rule_params(config.rule, len(ordered), config.byzantine_fraction, config.trim_beta)
        result = aggregate(config.rule, [updates[c] for c in ordered], [counts[c] for c in ordered], **params)
        scores = score_round(ordered, [updates[c] for c in ordered], result, rep_cfg)
        reps = update_reputations(reps, scores, rep_cfg)
        global_w = [np.array(w, dtype=np.float32) for w in result.weights]
        run.accuracy.append(accuracy(global_w, *evaluation))
        if validation is not None:
            run.validation.append(accuracy(global_w, *validation))
        kept = {ordered[j] for j in result.kept}
        run.attackers_selected.append(sum(c in bad for c in chosen))
        run.honest_selected.append(sum(c not in bad for c in chosen))
        run.attackers_kept.append(sum(c in bad for c in kept))
        bad_reps = [reps.get(c, rep_cfg.prior) for c in bad]
        good_reps = [reps.get(c, rep_cfg.prior) for c in pool.ids if c not in bad]
        run.attacker_rep_max.append(max(bad_reps) if bad_reps else float("nan"))
        run.honest_rep_min.append(min(good_reps))
        if bad and run.rounds_to_floor is None and max(bad_reps) < rep_cfg.floor:
            run.rounds_to_floor = rnd
    run.weights = global_w
    return run


def _apply_attack(
    attack: Attack,
    global_w: list[np.ndarray],
    locals_: dict[str, list[np.ndarray]],
    bad: frozenset[str],
    rng: np.random.Generator,
) -> dict[str, list[np.ndarray]]:
    out = dict(locals_)
    attackers = sorted(c for c in locals_ if c in bad)
    if not attackers or attack in (Attack.NONE, Attack.LABEL_FLIP):
        return out
    if attack is Attack.COLLUDE:
        mean_delta = [np.mean([locals_[c][j] - g for c in attackers], axis=0) for j, g in enumerate(global_w)]
        poisoned = [(g - 3.0 * d).astype(np.float32) for g, d in zip(global_w, mean_delta, strict=True)]
        return out | {c: [p.copy() for p in poisoned] for c in attackers}
    for c in attackers:
        delta = [w - g for w, g in zip(locals_[c], global_w, strict=True)]
        if attack is Attack.SIGN_FLIP:
            out[c] = [(g - d).astype(np.float32) for g, d in zip(global_w, delta, strict=True)]
        elif attack is Attack.SCALE:
            out[c] = [(g + 10.0 * d).astype(np.float32) for g, d in zip(global_w, delta, strict=True)]
        elif attack is Attack.NOISE:
            out[c] = [(g + rng.normal(0.0, 1.0, g.shape)).astype(np.float32) for g in global_w]
    return out
