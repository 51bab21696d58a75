"""Why the federated head lags the pooled nearest-class-mean reference on digits (issue 14).

    .venv/bin/python -m bench.quality.lag_study [--quick]   # -> bench/results/quality_lag.json

Per seed (new split, front, customers, noise) and epsilon, on exactly the same releases:

* **ncm_pooled**: the reference of docs/quality.md, class means of all customers' noisy features
  pooled (each class mean weighted by every customer's count in that class: sufficient statistics);
* **ncm_customer_average**: the same rule on the average of the customers' own class means, each
  customer weighted by its total sample count, i.e. what FedAvg makes of the edge's class-statistics
  heads (``edge_server.trainer``), computed directly, without training;
* the federated runs of the seed study (10 rounds, cumulative releases) with the edge's trainer
  (class-statistics head + fine-tuning, its numpy mirror), with the fine-tuning switched off
  (``stats_only``), each under FedAvg and under coordinate median (the defended rounds' default).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

import numpy as np


def _ncm(means: np.ndarray, evaluation: tuple[np.ndarray, np.ndarray]) -> float:
    pred = ((evaluation[0][:, None, :] - means[None]) ** 2).sum(axis=-1).argmin(axis=1)
    return float((pred == evaluation[1]).mean())


def customer_average_means(pool: Any, classes: int) -> np.ndarray:
    """Class means per customer, averaged over customers weighted by their total counts (a class a
    customer lacks takes the pooled mean, as the edge falls back to the global estimate)."""
    x = np.concatenate(pool.features)
    y = np.concatenate(pool.labels)
    pooled = np.stack([x[y == k].mean(axis=0) for k in range(classes)])
    acc = np.zeros_like(pooled)
    total = 0
    for f, lab in zip(pool.features, pool.labels, strict=True):
        mu = np.stack([f[lab == k].mean(axis=0) if (lab == k).any() else pooled[k] for k in range(classes)])
        acc += len(lab) * mu
        total += len(lab)
    return acc / total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", default="0,1,2,3,4")
    args = p.parse_args(argv)

    from bench.results_io import write_result
    from crowdfl.backmodel import initial_back_weights

    from . import digits as dg
    from . import fasttrain
    from .federation import FedConfig, run_federation

    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    setup = dg.DigitsSetup()
    rows: list[dict[str, Any]] = []
    steps = fasttrain.FINETUNE_STEPS
    for seed in seeds:
        split = dg.load_split(setup, seed)
        for f in dg.design_fronts("paper", (2.0,) if args.quick else (2.0, 5.0), setup, split, seed):
            pool = dg.customer_pool(f, split, setup, seed)
            test = (dg.clean_features(f, split.test[0]), split.test[1])
            x = np.concatenate(pool.features)
            y = np.concatenate(pool.labels)
            c = 10
            row: dict[str, Any] = {
                "seed": seed, "epsilon": f.epsilon,
                "ncm_pooled": _ncm(np.stack([x[y == k].mean(axis=0) for k in range(c)]), test),
                "ncm_customer_average": _ncm(customer_average_means(pool, c), test),
                "min_class_count_per_customer": int(min(np.bincount(lab, minlength=c).min() for lab in pool.labels)),
            }
            spr = -(-max(len(lab) for lab in pool.labels) // setup.rounds)
            spec = replace(f.spec, hidden_units=128, learning_rate=0.002, local_epochs=10)
            for name, n_steps, rule in (("edge_fedavg", steps, "fedavg"), ("stats_only_fedavg", 0, "fedavg"),
                                        ("edge_median", steps, "coordinate_median"), ("stats_only_median", 0, "coordinate_median")):
                fasttrain.FINETUNE_STEPS = n_steps
                try:
                    run = run_federation(spec, initial_back_weights(spec, seed), pool, test, FedConfig(setup.rounds, spr, rule),
                                         fasttrain.train_numpy, seed)
                finally:
                    fasttrain.FINETUNE_STEPS = steps
                row[name] = run.final
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    summary: dict[str, Any] = {}
    for eps in sorted({r["epsilon"] for r in rows}):
        sel = [r for r in rows if r["epsilon"] == eps]
        summary[f"{eps:g}"] = {
            k: {"mean": float(np.mean([r[k] for r in sel])), "std": float(np.std([r[k] for r in sel], ddof=1)) if len(sel) > 1 else 0.0,
                "min": float(min(r[k] for r in sel)), "max": float(max(r[k] for r in sel))}
            for k in ("ncm_pooled", "ncm_customer_average", "edge_fedavg", "stats_only_fedavg", "edge_median", "stats_only_median")
        }
    for eps, s in summary.items():
        print(f"eps {eps}: " + ", ".join(f"{k} {v['mean']:.3f} ± {v['std']:.3f}" for k, v in s.items()))
    write_result("quality_lag", {"seeds": seeds, "rows": rows, "summary": summary}, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
