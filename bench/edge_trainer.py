"""Time the edge's per-customer training against the trainer it replaced, in the same run.

    .venv/bin/python bench/edge_trainer.py            # the figures in bench/results/edge_trainer.json
    .venv/bin/python bench/edge_trainer.py --quick    # fewer repetitions, seconds

**Ours**: `edge_server.trainer.HeadTrainer`, built once per task (one traced `tf.function`), then
`train` per customer and round, as the edge server keeps it. **Baseline**:
`bench.quality.fasttrain.train_keras_legacy`, the edge's trainer before issue 14 (a fresh Keras
model built, compiled and fitted by Adam on every call). Both train the same customers' data: noisy
features drawn like the agent's (`agent.privacy.privatise_features` on front-like features in
[0, 1], epsilon 4), for the default task's head (40 hidden units, 4 classes, 8 features), at two
sizes: 39 samples (the default task's three rounds of 13) and 768 (the quality bench's 8 rounds of
96). Per size: median and spread of the time per training over customers x repetitions, the
machine's load average beside it (2 cores shared with other jobs), and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def customer_data(n: int, seed: int, spec: Any) -> Any:
    from agent.privacy import privatise_features
    from edge_server.store import CustomerData

    rng = np.random.default_rng(seed)
    y = rng.integers(0, spec.num_classes, n)
    centres = rng.uniform(0.02, 0.2, (spec.num_classes, spec.feature_dim))
    raw = np.clip(centres[y] + rng.normal(0, 0.03, (n, spec.feature_dim)), 0, 1).astype(np.float32)
    x = privatise_features(raw, spec, np.random.default_rng([seed, 1]))
    return CustomerData(np.arange(n, dtype=np.uint64), x, y.astype(np.int64))


def timed(fn: Any, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from bench.quality.fasttrain import train_keras_legacy
    from bench.results_io import write_result
    from crowdfl.backmodel import initial_back_weights
    from edge_server.trainer import HeadTrainer
    from tests.helpers import make_spec

    spec = make_spec(hidden_units=40, epsilon=4.0, learning_rate=0.005, local_epochs=5)
    customers = 3 if args.quick else 10
    reps = 3 if args.quick else 20
    legacy_reps = 1 if args.quick else 2
    glob = initial_back_weights(spec, 0)
    t0 = time.perf_counter()
    trainer = HeadTrainer(spec)
    build_s = time.perf_counter() - t0
    figures: dict[str, Any] = {"spec": {"hidden_units": spec.hidden_units, "feature_dim": spec.feature_dim, "classes": spec.num_classes,
                                        "epsilon": spec.epsilon}, "build_and_trace_once_s": None, "sizes": {}}
    first = True
    for n in (39, 768):
        data = [customer_data(n, 100 * n + i, spec) for i in range(customers)]
        if first:  # the first call traces the tf.function: once per task on the edge
            t0 = time.perf_counter()
            trainer.train(glob, data[0], 0)
            figures["build_and_trace_once_s"] = build_s + time.perf_counter() - t0
            first = False
        load_before = os.getloadavg()[0]
        ours = [t for i, d in enumerate(data) for t in timed(lambda d=d, i=i: trainer.train(glob, d, i), reps)]
        legacy = [t for i, d in enumerate(data) for t in timed(lambda d=d, i=i: train_keras_legacy(glob, d, spec, i), legacy_reps)]
        load_after = os.getloadavg()[0]
        ours_ms = statistics.median(ours) * 1000
        legacy_ms = statistics.median(legacy) * 1000
        figures["sizes"][str(n)] = {
            "samples": n, "customers": customers,
            "ours_ms": {"median": ours_ms, "p10": float(np.percentile(ours, 10) * 1000), "p90": float(np.percentile(ours, 90) * 1000),
                        "calls": len(ours)},
            "legacy_ms": {"median": legacy_ms, "p10": float(np.percentile(legacy, 10) * 1000),
                          "p90": float(np.percentile(legacy, 90) * 1000), "calls": len(legacy)},
            "ratio_legacy_over_ours": legacy_ms / ours_ms,
            "load_avg_1m": [load_before, load_after],
        }
        print(f"{n:4d} samples: edge trainer {ours_ms:7.1f} ms per training (p10-p90 {figures['sizes'][str(n)]['ours_ms']['p10']:.1f}-"
              f"{figures['sizes'][str(n)]['ours_ms']['p90']:.1f}), old trainer {legacy_ms:7.0f} ms: {legacy_ms / ours_ms:5.0f}x "
              f"(load {load_before:.1f}-{load_after:.1f} on {os.cpu_count()} cpus)")
    path = write_result("edge_trainer", figures, quick=args.quick)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
