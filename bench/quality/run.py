"""Regenerate every figure of the quality benchmark: `python -m bench.quality [--quick]`.

Writes results.json, report.md and the PNG plots to bench/results/quality/ (or --out), and the
report to docs/quality.md as well (unless --no-docs). Every choice of hyperparameters is made on
validation data (the manufacturer's own validation digits / households); test data only feed the
reported figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
INF = float("inf")
# (name in the report, rule, byzantine fraction for Multi-Krum's f, trim beta): the coordinator's
# defaults (0.2, 0.1) and, for the two rules that take a parameter, the setting a 30% attack needs.
RULE_CONFIGS: tuple[tuple[str, str, float, float], ...] = (
    ("fedavg", "fedavg", 0.2, 0.1),
    ("multi_krum", "multi_krum", 0.2, 0.1),
    ("multi_krum f=0.3n", "multi_krum", 0.3, 0.1),
    ("median", "coordinate_median", 0.2, 0.1),
    ("trimmed_mean", "trimmed_mean", 0.2, 0.1),
    ("trimmed_mean β=0.3", "trimmed_mean", 0.2, 0.3),
)


@dataclass(frozen=True)
class Plan:
    """What one run measures; `--quick` shrinks every axis."""

    quick: bool
    seed: int
    digits_epsilons: tuple[float, ...]
    digits_variants: tuple[str, ...]
    digits_heads: tuple[tuple[int, float, int], ...]  # (hidden units, learning rate, local epochs), picked on validation
    digits_rounds: int
    digits_pretrain_epochs: int
    digits_volume_repeats: int  # 0: skip the data-volume ablation
    household_epsilons: tuple[float, ...]
    attack_epsilon: float
    attack_fractions: tuple[float, ...]
    attacks: tuple[str, ...]
    rules: tuple[str, ...]
    reputation: tuple[bool, ...]
    customers: int
    rounds: int
    samples_per_round: int
    check_rounds: int
    check_customers: int
    shadow_homes: int
    victim_homes: int
    seeds: tuple[int, ...] = ()  # the seed study: digits (paper front) and household, per seed, new vs legacy trainer
    seed_digits_epsilons: tuple[float, ...] = (2.0, 5.0)
    seed_household_epsilons: tuple[float, ...] = (1.0, 2.0, 4.0)
    label_seeds: tuple[int, ...] = ()  # the label-privacy study (household, at the attack epsilon)
    label_epsilons: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)

    @staticmethod
    def make(quick: bool, seed: int) -> Plan:
        from .federation import Attack

        if quick:
            return Plan(
                quick=True, seed=seed,
                digits_epsilons=(1.0, 5.0, INF), digits_variants=("paper",),
                digits_heads=((64, 0.005, 20),), digits_rounds=10, digits_pretrain_epochs=20,
                digits_volume_repeats=0,
                household_epsilons=(4.0,), attack_epsilon=4.0, attack_fractions=(0.2,),
                attacks=(Attack.SCALE.value,), rules=("fedavg", "multi_krum"), reputation=(False,),
                customers=12, rounds=5, samples_per_round=96, check_rounds=1, check_customers=4,
                shadow_homes=30, victim_homes=30,
                seeds=(seed,), seed_digits_epsilons=(2.0,), seed_household_epsilons=(4.0,),
                label_seeds=(seed,), label_epsilons=(0.0, 2.0),
            )
        return Plan(
            quick=False, seed=seed,
            digits_epsilons=(0.5, 1.0, 2.0, 5.0, 8.0, INF),
            digits_variants=("paper", "batchnorm", "none", "paper_noise_aware"),
            digits_heads=((64, 0.005, 20), (128, 0.002, 10), (32, 0.01, 10), (256, 0.002, 10)), digits_rounds=10,
            digits_pretrain_epochs=30, digits_volume_repeats=95,
            household_epsilons=(0.5, 1.0, 2.0, 4.0, 5.0, 8.0, INF), attack_epsilon=4.0,
            attack_fractions=(0.1, 0.2, 0.3), attacks=tuple(a.value for a in Attack if a is not Attack.NONE),
            rules=tuple(c[0] for c in RULE_CONFIGS), reputation=(False, True), customers=20, rounds=8, samples_per_round=96,
            check_rounds=2, check_customers=20, shadow_homes=80, victim_homes=80,
            seeds=tuple(range(seed, seed + 5)), label_seeds=tuple(range(seed, seed + 3)),
        )


@dataclass
class Results:
    plan: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)
    trainer_check: dict[str, Any] = field(default_factory=dict)
    digits: dict[str, Any] = field(default_factory=dict)
    household: dict[str, Any] = field(default_factory=dict)
    attacks: dict[str, Any] = field(default_factory=dict)
    inference: list[dict[str, Any]] = field(default_factory=list)
    seeds: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("numpy", "tensorflow-cpu", "tensorflow", "keras", "ai-edge-litert", "scikit-learn", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _eps_key(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def _quiet() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import warnings

    warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
    logging.getLogger("absl").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- parts


def run_trainer_check(plan: Plan, design: Any, pool: Any, test: Any, res: Results, log: Any) -> None:
    """The edge's TensorFlow trainer against its numpy mirror (same rounds, same data), and both
    against the trainer the edge used before (`fasttrain.train_keras_legacy`), timed in this run."""
    from .fasttrain import KerasTrainers, train_keras_legacy, train_numpy
    from .federation import FedConfig, Pool, run_federation

    sub = Pool(pool.ids[: plan.check_customers], pool.features[: plan.check_customers], pool.labels[: plan.check_customers])
    cfg = FedConfig(plan.check_rounds, plan.samples_per_round)
    out: dict[str, Any] = {"customers": len(sub.ids), "rounds": plan.check_rounds}
    keras_trainer = KerasTrainers()
    keras_trainer(design.initial, _one_customer(sub), design.spec, 0)  # build and trace once per task, as the edge does
    for name, trainer in (("keras", keras_trainer), ("numpy", train_numpy), ("keras_legacy", train_keras_legacy)):
        t0 = time.perf_counter()
        run = run_federation(design.spec, design.initial, sub, test, cfg, trainer, plan.seed)
        out[name] = {"accuracy": run.accuracy, "seconds": time.perf_counter() - t0}
    calls = len(sub.ids) * plan.check_rounds
    out["seconds_per_training"] = {k: out[k]["seconds"] / calls for k in ("keras", "numpy", "keras_legacy")}
    out["speedup_vs_legacy"] = out["seconds_per_training"]["keras_legacy"] / out["seconds_per_training"]["keras"]
    out["max_abs_accuracy_gap"] = float(np.max(np.abs(np.subtract(out["keras"]["accuracy"], out["numpy"]["accuracy"]))))
    res.trainer_check = out
    sp = out["seconds_per_training"]
    log(f"trainer check: keras {out['keras']['accuracy']} vs numpy {out['numpy']['accuracy']} vs legacy {out['keras_legacy']['accuracy']} "
        f"({sp['keras'] * 1000:.1f} ms vs {sp['numpy'] * 1000:.1f} ms vs legacy {sp['keras_legacy'] * 1000:.0f} ms per training, "
        f"{out['speedup_vs_legacy']:.0f}x faster)")


def _one_customer(pool: Any) -> Any:
    from edge_server.store import CustomerData

    n = len(pool.labels[0])
    return CustomerData(np.arange(n, dtype=np.uint64), pool.features[0], pool.labels[0])


def run_digits(plan: Plan, res: Results, log: Any) -> None:
    from crowdfl.backmodel import accuracy, initial_back_weights

    from . import digits as dg
    from .fasttrain import train_numpy
    from .federation import FedConfig, run_federation

    setup = dg.DigitsSetup(rounds=plan.digits_rounds, pretrain_epochs=plan.digits_pretrain_epochs)
    split = dg.load_split(setup, plan.seed)
    out: dict[str, Any] = {
        "sizes": {k: int(len(getattr(split, k)[1])) for k in ("lab", "validation", "customers", "test")},
        "customers": setup.customers, "rounds": setup.rounds, "feature_dim": setup.feature_dim,
        "clip_l1": setup.clip_l1, "rows": [],
    }
    t0 = time.perf_counter()
    val_c, test_c = dg.central_baseline(setup, split, plan.seed)
    out["central"] = {"validation": val_c, "test": test_c, "seconds": time.perf_counter() - t0}
    log(f"digits: central non-private CNN {test_c:.3f} (validation {val_c:.3f})")
    chosen: dict[tuple[str, float], tuple[Any, Any]] = {}
    for variant in plan.digits_variants:
        fronts = dg.design_fronts(variant, plan.digits_epsilons, setup, split, plan.seed)
        for f in fronts:
            pool = dg.customer_pool(f, split, setup, plan.seed)
            test = (dg.clean_features(f, split.test[0]), split.test[1])
            val = (dg.clean_features(f, split.validation[0]), split.validation[1])
            n = max(len(lab) for lab in pool.labels)
            spr = -(-n // setup.rounds)
            best: tuple[float, Any, Any] | None = None
            for hidden, lr, epochs in plan.digits_heads:
                spec = replace(f.spec, hidden_units=hidden, learning_rate=lr, local_epochs=epochs)
                run = run_federation(spec, initial_back_weights(spec, plan.seed), pool, test, FedConfig(setup.rounds, spr), train_numpy, plan.seed, val)
                if best is None or run.validation[-1] > best[0]:
                    best = (run.validation[-1], run, spec)
            assert best is not None
            _, run, spec = best
            chosen[(variant, f.epsilon)] = (f, spec)
            noisy_test = accuracy(run.weights, dg.noisy_test(f, split.test[0], plan.seed), split.test[1]) if math.isfinite(f.epsilon) else run.final
            row = {
                "variant": variant, "epsilon": _eps_key(f.epsilon), "test": run.final, "validation": run.validation[-1],
                "per_round": run.accuracy, "noisy_test": noisy_test,
                "nearest_mean": dg.nearest_mean_accuracy(pool, test), "lab_only_test": f.lab_test_accuracy,
                "head": {"hidden_units": spec.hidden_units, "learning_rate": spec.learning_rate, "local_epochs": spec.local_epochs},
                "sensitivity_over_eps": (min(2 * f.spec.clip_l1, f.spec.feature_dim) / f.epsilon) if math.isfinite(f.epsilon) else 0.0,
                "design_seconds": f.seconds,
            }
            out["rows"].append(row)
            log(f"digits {variant:>17} eps {row['epsilon']:>3}: test {row['test']:.3f} (val {row['validation']:.3f}, "
                f"nearest-mean {row['nearest_mean']:.3f}, lab only {row['lab_only_test']:.3f})")
    out["volume"] = []
    for eps in (2.0, 5.0):
        if plan.digits_volume_repeats <= 1 or ("paper", eps) not in chosen:
            continue
        f, spec = chosen[("paper", eps)]
        pool = dg.customer_pool(f, split, setup, plan.seed, repeats=plan.digits_volume_repeats)
        test = (dg.clean_features(f, split.test[0]), split.test[1])
        n = max(len(lab) for lab in pool.labels)
        run = run_federation(spec, initial_back_weights(spec, plan.seed), pool, test, FedConfig(setup.rounds, -(-n // setup.rounds)), train_numpy, plan.seed)
        row = {"epsilon": _eps_key(eps), "repeats": plan.digits_volume_repeats, "samples": int(sum(len(lab) for lab in pool.labels)),
               "test": run.final, "nearest_mean": dg.nearest_mean_accuracy(pool, test)}
        out["volume"].append(row)
        log(f"digits volume ablation eps {eps:g} x{plan.digits_volume_repeats}: test {run.final:.3f} (nearest-mean {row['nearest_mean']:.3f})")
    res.digits = out


def run_household(plan: Plan, res: Results, log: Any) -> tuple[dict[float, Any], tuple[Any, Any, Any]]:
    """Per epsilon: federated accuracy, the ceiling and the floor.

    Returns the designs per epsilon and (pool, test, validation) at the attack epsilon.
    """
    from crowdfl.backmodel import accuracy
    from edge_server.store import CustomerData

    from . import household_task as hh
    from .fasttrain import train_numpy
    from .federation import FedConfig, run_federation

    setup = hh.HouseholdSetup(customers=plan.customers, rounds=plan.rounds, samples_per_round=plan.samples_per_round)
    designs: dict[float, Any] = {}
    attack_data: tuple[Any, Any, Any] | None = None
    out: dict[str, Any] = {"setup": asdict(setup), "rows": []}
    eps_list = sorted(set(plan.household_epsilons) | {plan.attack_epsilon})
    for eps in eps_list:
        d = hh.design(eps, setup, plan.seed)
        designs[eps] = d
        cust = hh.homes(setup.customers, plan.seed + 1, setup.history_days, d.spec)
        test_h = hh.homes(setup.test_households, plan.seed + 10_000, setup.history_days, d.spec)
        val_h = hh.homes(setup.validation_households, plan.seed + 20_000, setup.history_days, d.spec)
        pool = hh.noisy_pool(d, cust, plan.seed, setup.rounds * setup.samples_per_round)
        test, val = hh.evaluation_set(d, test_h), hh.evaluation_set(d, val_h)
        run = run_federation(d.spec, d.initial, pool, test, FedConfig(setup.rounds, setup.samples_per_round), train_numpy, plan.seed, val)
        # floor: every household trains its own head over the same rounds, alone
        alone = []
        for i in range(len(pool.ids)):
            w = list(d.initial)
            for rnd in range(1, setup.rounds + 1):
                n = min(rnd * setup.samples_per_round, len(pool.labels[i]))
                data = CustomerData(np.arange(n, dtype=np.uint64), pool.features[i][:n], pool.labels[i][:n])
                w = train_numpy(w, data, d.spec, plan.seed * 1000 + rnd)
            alone.append(accuracy(w, *test))
        row = {
            "epsilon": _eps_key(eps), "test": run.final, "validation": run.validation[-1], "per_round": run.accuracy,
            "floor_mean": float(np.mean(alone)), "floor_min": float(np.min(alone)), "floor_max": float(np.max(alone)),
            "pretrain_lab_accuracy": d.pretrain_accuracy, "design_seconds": d.seconds,
        }
        if math.isinf(eps):
            t0 = time.perf_counter()
            row["ceiling_central_raw"] = hh.central_ceiling(d, cust, test_h, plan.seed)
            row["ceiling_seconds"] = time.perf_counter() - t0
            out["ceiling_central_raw"] = row["ceiling_central_raw"]
        out["rows"].append(row)
        log(f"household eps {row['epsilon']:>3}: federated {row['test']:.3f} (val {row['validation']:.3f}), "
            f"alone {row['floor_mean']:.3f} [{row['floor_min']:.3f}-{row['floor_max']:.3f}]"
            + (f", central raw {row['ceiling_central_raw']:.3f}" if "ceiling_central_raw" in row else ""))
        if eps == plan.attack_epsilon:
            attack_data = (pool, test, val)
    res.household = out
    assert attack_data is not None
    return designs, attack_data


def run_attacks(plan: Plan, d: Any, pool: Any, test: Any, val: Any, res: Results, log: Any) -> None:
    from .fasttrain import train_numpy
    from .federation import Attack, FedConfig, run_federation

    runs: list[dict[str, Any]] = []
    configs = {c[0]: c[1:] for c in RULE_CONFIGS}
    for name in plan.rules:
        rule, byz, beta = configs[name]
        for rep in plan.reputation:
            base_cfg = FedConfig(plan.rounds, plan.samples_per_round, rule, rep, byzantine_fraction=byz, trim_beta=beta)
            base = run_federation(d.spec, d.initial, pool, test, base_cfg, train_numpy, plan.seed, val)
            runs.append(_attack_row(name, rep, Attack.NONE.value, 0.0, base))
            for attack in plan.attacks:
                for frac in plan.attack_fractions:
                    cfg = replace(base_cfg, attack=Attack(attack), malicious_fraction=frac)
                    run = run_federation(d.spec, d.initial, pool, test, cfg, train_numpy, plan.seed, val)
                    runs.append(_attack_row(name, rep, attack, frac, run))
        log(f"attacks: {name} done")
    res.attacks = {"epsilon": _eps_key(plan.attack_epsilon), "customers": len(pool.ids), "rounds": plan.rounds, "runs": runs}


def _attack_row(rule: str, rep: bool, attack: str, frac: float, run: Any) -> dict[str, Any]:
    return {
        "rule": rule, "reputation": rep, "attack": attack, "fraction": frac, "test": run.final,
        "validation": run.validation[-1], "per_round": run.accuracy, "validation_per_round": run.validation,
        "rounds_to_floor": run.rounds_to_floor, "attackers_selected": run.attackers_selected,
        "attackers_kept": run.attackers_kept, "honest_selected": run.honest_selected,
        "attacker_rep_max": run.attacker_rep_max, "honest_rep_min": run.honest_rep_min,
    }


def run_inference(plan: Plan, designs: dict[float, Any], res: Results, log: Any) -> None:
    from . import household_task as hh
    from .inference_attack import attribute_inference

    per_home = plan.rounds * plan.samples_per_round
    for eps in sorted(designs):
        d = designs[eps]
        shadow = hh.homes(plan.shadow_homes, plan.seed + 30_000, 42, d.spec)
        victims = hh.homes(plan.victim_homes, plan.seed + 40_000, 42, d.spec)
        r = attribute_inference(d, shadow, victims, per_home, plan.seed)
        res.inference.append(asdict(r) | {"epsilon": _eps_key(eps)})
        log(f"inference eps {_eps_key(eps):>3}: R2 features {r.r2_features:.3f} label {r.r2_label:.3f} both {r.r2_both:.3f}; "
            f"AUC EV {r.auc_ev:.3f} dishwasher {r.auc_dishwasher:.3f}")


def run_seeds(plan: Plan, res: Results, log: Any) -> None:
    """The issue-14 targets over several seeds: per seed a new split, front design and customers.

    Digits (paper front, the head of `DigitsSetup` widened to 128 units so the class-statistics
    head fits): the edge's trainer against the nearest-class-mean reference on the same releases
    and against the legacy trainer's procedure (`train_numpy_sgd`, the head the bench picked before:
    128 units, 0.002, 10 epochs). Household: federated vs training alone vs the central noiseless
    ceiling, per epsilon.
    """
    from crowdfl.backmodel import accuracy, initial_back_weights
    from edge_server.store import CustomerData

    from . import digits as dg
    from . import household_task as hh
    from .fasttrain import train_numpy, train_numpy_sgd
    from .federation import FedConfig, run_federation

    out: dict[str, Any] = {"seeds": list(plan.seeds), "digits": [], "household": []}
    setup = dg.DigitsSetup(rounds=plan.digits_rounds, pretrain_epochs=plan.digits_pretrain_epochs)
    for seed in plan.seeds:
        split = dg.load_split(setup, seed)
        for f in dg.design_fronts("paper", plan.seed_digits_epsilons, setup, split, seed):
            pool = dg.customer_pool(f, split, setup, seed)
            test = (dg.clean_features(f, split.test[0]), split.test[1])
            spr = -(-max(len(lab) for lab in pool.labels) // setup.rounds)
            spec = replace(f.spec, hidden_units=128, learning_rate=0.002, local_epochs=10)
            row: dict[str, Any] = {"seed": seed, "epsilon": _eps_key(f.epsilon), "nearest_mean": dg.nearest_mean_accuracy(pool, test)}
            for name, trainer in (("edge", train_numpy), ("legacy", train_numpy_sgd)):
                run = run_federation(spec, initial_back_weights(spec, seed), pool, test, FedConfig(setup.rounds, spr), trainer, seed)
                row[name] = run.final
            out["digits"].append(row)
            log(f"seeds: digits seed {seed} eps {row['epsilon']}: edge {row['edge']:.3f}, legacy {row['legacy']:.3f}, "
                f"nearest-mean {row['nearest_mean']:.3f}")
        hs = hh.HouseholdSetup(customers=plan.customers, rounds=plan.rounds, samples_per_round=plan.samples_per_round)
        ceiling: float | None = None
        for eps in plan.seed_household_epsilons:
            d = hh.design(eps, hs, seed)
            cust = hh.homes(hs.customers, seed + 1, hs.history_days, d.spec)
            test_h = hh.homes(hs.test_households, seed + 10_000, hs.history_days, d.spec)
            pool = hh.noisy_pool(d, cust, seed, hs.rounds * hs.samples_per_round)
            test = hh.evaluation_set(d, test_h)
            cfg = FedConfig(hs.rounds, hs.samples_per_round)
            row = {"seed": seed, "epsilon": _eps_key(eps)}
            for name, trainer in (("edge", train_numpy), ("legacy", train_numpy_sgd)):
                row[name] = run_federation(d.spec, d.initial, pool, test, cfg, trainer, seed).final
            alone = []
            for i in range(len(pool.ids)):
                w = list(d.initial)
                for rnd in range(1, hs.rounds + 1):
                    n = min(rnd * hs.samples_per_round, len(pool.labels[i]))
                    w = train_numpy(w, CustomerData(np.arange(n, dtype=np.uint64), pool.features[i][:n], pool.labels[i][:n]), d.spec, seed * 1000 + rnd)
                alone.append(accuracy(w, *test))
            row["alone_mean"] = float(np.mean(alone))
            if ceiling is None:
                ceiling = hh.central_ceiling(d, cust, test_h, seed)  # raw, noiseless: the same for every epsilon
            row["ceiling_central_raw"] = ceiling
            out["household"].append(row)
            log(f"seeds: household seed {seed} eps {row['epsilon']}: edge {row['edge']:.3f}, legacy {row['legacy']:.3f}, "
                f"alone {row['alone_mean']:.3f}, ceiling {ceiling:.3f}")
    res.seeds = out


def run_labels(plan: Plan, res: Results, log: Any) -> None:
    """What label privacy costs and buys: the household task at the attack epsilon with k-ary
    randomised response on the labels (the agent's `randomised_response`), per label epsilon:
    federated accuracy (the edge un-mixes the known channel) and the home-level attribute
    inference from the label histogram alone (EV charger, dishwasher)."""
    from . import household_task as hh
    from .fasttrain import train_numpy
    from .federation import FedConfig, run_federation
    from .inference_attack import attribute_inference

    rows: list[dict[str, Any]] = []
    hs = hh.HouseholdSetup(customers=plan.customers, rounds=plan.rounds, samples_per_round=plan.samples_per_round)
    for seed in plan.label_seeds:
        base = hh.design(plan.attack_epsilon, hs, seed)
        cust = hh.homes(hs.customers, seed + 1, hs.history_days, base.spec)
        test = hh.evaluation_set(base, hh.homes(hs.test_households, seed + 10_000, hs.history_days, base.spec))
        shadow = hh.homes(plan.shadow_homes, seed + 30_000, 42, base.spec)
        victims = hh.homes(plan.victim_homes, seed + 40_000, 42, base.spec)
        for le in plan.label_epsilons:
            d = replace(base, spec=replace(base.spec, label_epsilon=float(le)))
            pool = hh.noisy_pool(d, cust, seed, hs.rounds * hs.samples_per_round)
            run = run_federation(d.spec, d.initial, pool, test, FedConfig(hs.rounds, hs.samples_per_round), train_numpy, seed)
            r = attribute_inference(d, shadow, victims, plan.rounds * plan.samples_per_round, seed)
            row = {"seed": seed, "label_epsilon": float(le), "test": run.final, "auc_ev_labels": r.auc_ev_labels,
                   "auc_dishwasher_labels": r.auc_dishwasher_labels, "auc_ev": r.auc_ev, "r2_label": r.r2_label}
            rows.append(row)
            log(f"labels: seed {seed} label eps {le:g}: federated {row['test']:.3f}, AUC EV from labels {row['auc_ev_labels']:.3f}")
    res.labels = {"epsilon": _eps_key(plan.attack_epsilon), "rows": rows}


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~2 minute subset (what tests/test_quality_quick.py runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/quality, or .../quick with --quick)")
    parser.add_argument("--no-docs", action="store_true", help="do not copy the report to docs/quality.md")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report and plots from the existing results.json")
    parser.add_argument("--only", choices=("labels", "seeds", "digits"), help="run one part into the existing results.json (merged), then rewrite the report")
    parser.add_argument("--seeds", default="", help="comma-separated seeds for the seed study (default: the plan's)")
    parser.add_argument("--skip", default="", help="comma-separated parts not to run (seeds, labels): to run them in a parallel process")
    args = parser.parse_args(argv)
    _quiet()
    out = args.out or (ROOT / "bench" / "results" / "quality" / ("quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        _write_outputs(json.loads((out / "results.json").read_text()), out, docs=not (args.no_docs or args.quick))
        return 0
    plan = Plan.make(args.quick, args.seed)
    if args.seeds:
        plan = replace(plan, seeds=tuple(int(x) for x in args.seeds.split(",")))
    if args.only:
        # one part in its own process (parts are independent: each seeds its own generators), merged
        # into the results.json of the run it completes
        prev = json.loads((out / "results.json").read_text())
        res_part = Results(plan=prev["plan"])
        t_part = time.perf_counter()
        part_log = lambda m: print(f"[{time.perf_counter() - t_part:6.1f}s] {m}", flush=True)  # noqa: E731
        if args.only == "labels":
            run_labels(plan, res_part, part_log)
            prev["labels"] = res_part.labels
        elif args.only == "digits":
            run_digits(plan, res_part, part_log)
            prev["digits"] = res_part.digits
        else:
            run_seeds(plan, res_part, part_log)
            old = prev.get("seeds") or {"seeds": [], "digits": [], "household": []}
            mine = set(plan.seeds)
            prev["seeds"] = {
                "seeds": sorted(set(old["seeds"]) | mine),
                "digits": [r for r in old["digits"] if r["seed"] not in mine] + res_part.seeds["digits"],
                "household": [r for r in old["household"] if r["seed"] not in mine] + res_part.seeds["household"],
            }
        prev.setdefault("seconds", {})[args.only] = prev.get("seconds", {}).get(args.only, 0.0) + time.perf_counter() - t_part
        (out / "results.json").write_text(json.dumps(prev, indent=1, default=_json_default) + "\n")
        _write_outputs(prev, out, docs=not (args.no_docs or args.quick))
        return 0
    res = Results(plan=asdict(plan))
    res.environment = _versions() | {"cpus": os.cpu_count() or 0, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    t_all = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:6.1f}s] {msg}", flush=True)

    import keras  # noqa: F401  (import TensorFlow once, up front, so the timings below exclude it)

    res.seconds["import"] = time.perf_counter() - t_all

    def checkpoint() -> None:  # a long run keeps what it has measured so far
        (out / "results.json").write_text(json.dumps(res.__dict__, indent=1, default=_json_default) + "\n")

    skip = set(filter(None, args.skip.split(",")))
    if "seeds" not in skip:
        t0 = time.perf_counter()
        run_seeds(plan, res, log)
        res.seconds["seeds"] = time.perf_counter() - t0
        checkpoint()
    t0 = time.perf_counter()
    designs, (pool, test, val) = run_household(plan, res, log)
    res.seconds["household"] = time.perf_counter() - t0
    d_attack = designs[plan.attack_epsilon]
    t0 = time.perf_counter()
    run_trainer_check(plan, d_attack, pool, test, res, log)
    res.seconds["trainer_check"] = time.perf_counter() - t0
    checkpoint()
    t0 = time.perf_counter()
    run_attacks(plan, d_attack, pool, test, val, res, log)
    res.seconds["attacks"] = time.perf_counter() - t0
    checkpoint()
    t0 = time.perf_counter()
    run_inference(plan, designs, res, log)
    res.seconds["inference"] = time.perf_counter() - t0
    checkpoint()
    t0 = time.perf_counter()
    run_digits(plan, res, log)
    res.seconds["digits"] = time.perf_counter() - t0
    checkpoint()
    if "labels" not in skip:
        t0 = time.perf_counter()
        run_labels(plan, res, log)
        res.seconds["labels"] = time.perf_counter() - t0
    res.seconds["total"] = time.perf_counter() - t_all
    (out / "results.json").write_text(json.dumps(res.__dict__, indent=1, default=_json_default) + "\n")
    _write_outputs(res.__dict__, out, docs=not (args.no_docs or args.quick))
    log(f"done in {res.seconds['total']:.0f} s; report in {out / 'report.md'}")
    return 0


def _write_outputs(results: dict[str, Any], out: Path, docs: bool) -> None:
    from .report import write_report

    text = write_report(results, out)
    if docs:
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs" / "quality.md").write_text(text.replace("](", "](../bench/results/quality/"))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


if __name__ == "__main__":
    sys.exit(main())
