"""The bench's batched trainer is the per-customer one, step for step."""

from __future__ import annotations

import numpy as np

from bench.quality.fasttrain import train_many, train_numpy
from crowdfl.backmodel import initial_back_weights
from edge_server.store import CustomerData
from tests.coordinator.world import task_parts


def test_train_many_matches_train_numpy_per_customer() -> None:
    spec, _ = task_parts(rounds=2, local_epochs=2)
    g = [np.asarray(w, np.float32) for w in initial_back_weights(spec, 3)]
    rng = np.random.default_rng(0)
    jobs = []
    for i, n in enumerate((40, 40, 40, 17, 40)):  # two groups of sizes, one with a short last batch
        x = rng.uniform(0, 1, (n, spec.feature_dim)).astype(np.float32)
        y = rng.integers(0, spec.num_classes, n).astype(np.int64)
        jobs.append((x, y, 100 + i))
    many = train_many(g, jobs, spec)
    assert len(many) == len(jobs)
    for (x, y, s), got in zip(jobs, many, strict=True):
        one = train_numpy(g, CustomerData(np.arange(len(y), dtype=np.uint64), x, y), spec, s)
        for a, b in zip(one, got, strict=True):
            assert a.dtype == b.dtype == np.float32
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # customers really differ (each has its own data and shuffle)
    assert not np.allclose(many[0][2], many[1][2])
