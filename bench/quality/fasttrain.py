"""A numpy mirror of the edge's trainer (`edge_server.trainer.HeadTrainer`), for big sweeps.

`train_numpy` is the class-statistics head of `edge_server.trainer` in numpy (same arithmetic, in
float64 then float32, so it matches the TensorFlow version to rounding); for a head without room
for it, `train_numpy_sgd` mirrors the fallback (Dense-ReLU-Dense from the global weights, sparse
categorical cross-entropy on logits averaged over the batch, Keras 3's Adam with its default betas
and epsilon, batch 32 reshuffled every epoch, `spec.local_epochs` epochs at `spec.learning_rate`;
shuffling draws differ from TensorFlow's, so that one matches in distribution only).
`run.run_trainer_check` measures the gap in each run of the benchmark, and times the edge's trainer
against `train_keras_legacy`, the trainer the edge used before (a fresh Keras model per call).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordinator.reference import BETA_1, BETA_2, EPSILON, adam_head  # Keras' Adam defaults
from crowdfl.backmodel import check_back_weights
from crowdfl.messages import TaskSpec
from edge_server.store import CustomerData
from crowdfl.headstats import statistics_head, statistics_head_fits
from edge_server.trainer import HeadTrainer


def train_numpy(global_weights: Sequence[np.ndarray], data: CustomerData, spec: TaskSpec, seed: int) -> list[np.ndarray]:
    """The edge's trainer in numpy: the class-statistics head (``crowdfl.headstats``), or the Adam fallback."""
    if not statistics_head_fits(spec):
        return train_numpy_sgd(global_weights, data, spec, seed)
    return statistics_head(global_weights, data.features, data.labels, spec)


def train_numpy_sgd(global_weights: Sequence[np.ndarray], data: CustomerData, spec: TaskSpec, seed: int) -> list[np.ndarray]:
    """Local epochs of Adam on the customer's noisy features, from the round's global model (the
    same numpy Adam the coordinator trains its FLTrust reference with)."""
    check_back_weights(global_weights, spec)
    if len(data.labels) == 0:
        raise ValueError("no samples to train on")
    return adam_head(global_weights, np.asarray(data.features, np.float32), np.asarray(data.labels, np.int64), spec, seed)


class KerasTrainers:
    """The edge server's own trainer (TensorFlow), one `HeadTrainer` per task, as the edge keeps them."""

    def __init__(self) -> None:
        self._by_task: dict[tuple[str, int, float], HeadTrainer] = {}

    def __call__(self, global_weights: Sequence[np.ndarray], data: CustomerData, spec: TaskSpec, seed: int) -> list[np.ndarray]:
        key = (spec.task_id, spec.hidden_units, spec.epsilon)
        if key not in self._by_task:
            self._by_task[key] = HeadTrainer(spec)
        return self._by_task[key].train(global_weights, data, seed).weights


def train_keras_legacy(global_weights: Sequence[np.ndarray], data: CustomerData, spec: TaskSpec, seed: int) -> list[np.ndarray]:
    """The edge's trainer before issue 14, kept as the timing and accuracy baseline: a fresh Keras
    model built, compiled and traced on every call, then Adam on the noisy features."""
    import keras

    from crowdfl.backmodel import keras_back

    check_back_weights(global_weights, spec)
    keras.utils.set_random_seed(seed)
    model = keras_back(spec)
    model.set_weights([np.asarray(w) for w in global_weights])
    model.compile(
        optimizer=keras.optimizers.Adam(spec.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(data.features, data.labels, epochs=spec.local_epochs, batch_size=32, shuffle=True, verbose=0)
    return [np.asarray(w, dtype=np.float32) for w in model.get_weights()]


def train_many(
    global_weights: Sequence[np.ndarray], jobs: Sequence[tuple[np.ndarray, np.ndarray, int]], spec: TaskSpec
) -> list[list[np.ndarray]]:
    """``train_numpy`` for several customers of one round at once: (features, labels, seed) each.

    For the Adam fallback, customers with the same sample count are trained together as one
    stacked (batched-matmul) computation: the same minibatch Adam, step for step, with each
    customer's own shuffling stream (so results match ``train_numpy_sgd`` to float rounding; BLAS
    may sum a batched product in another order). A bench-only speed-up: the Python overhead of
    thousands of tiny steps per run is paid once per group instead of once per customer.
    """
    if statistics_head_fits(spec):
        return [train_numpy(global_weights, CustomerData(np.arange(len(y), dtype=np.uint64), x, y), spec, s) for x, y, s in jobs]
    check_back_weights(global_weights, spec)
    out: list[list[np.ndarray] | None] = [None] * len(jobs)
    groups: dict[int, list[int]] = {}
    for j, (_, y, _) in enumerate(jobs):
        if len(y) == 0:
            raise ValueError("no samples to train on")
        groups.setdefault(len(y), []).append(j)
    for n, members in sorted(groups.items()):
        trained = _adam_stacked(global_weights, [jobs[j] for j in members], n, spec)
        for j, w in zip(members, trained, strict=True):
            out[j] = w
    return [w for w in out if w is not None]


def _adam_stacked(global_weights: Sequence[np.ndarray], jobs: Sequence[tuple[np.ndarray, np.ndarray, int]], n: int, spec: TaskSpec) -> list[list[np.ndarray]]:
    from coordinator.reference import BATCH

    k = len(jobs)
    xs = np.stack([np.asarray(x, np.float32) for x, _, _ in jobs])  # (k, n, d)
    ys = np.stack([np.asarray(y, np.int64) for _, y, _ in jobs])  # (k, n)
    rngs = [np.random.default_rng(s) for _, _, s in jobs]
    params = [np.repeat(np.array(w, dtype=np.float32)[None], k, axis=0) for w in global_weights]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    lr = np.float32(spec.learning_rate)
    rows = np.arange(k)[:, None]
    step = 0
    for _ in range(spec.local_epochs):
        orders = np.stack([r.permutation(n) for r in rngs])  # (k, n): each customer's own shuffle
        for start in range(0, n, BATCH):
            idx = orders[:, start : start + BATCH]
            b = idx.shape[1]
            x, y = xs[rows, idx], ys[rows, idx]  # (k, b, d), (k, b)
            w1, b1, w2, b2 = params
            pre = np.matmul(x, w1) + b1[:, None, :]
            h = np.maximum(pre, 0.0)
            logits = np.matmul(h, w2) + b2[:, None, :]
            logits = logits - logits.max(axis=2, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=2, keepdims=True)
            p[rows, np.arange(b)[None, :], y] -= 1.0
            g_logits = p / b
            g_h = np.matmul(g_logits, np.swapaxes(w2, 1, 2)) * (pre > 0)
            grads = (np.matmul(np.swapaxes(x, 1, 2), g_h), g_h.sum(axis=1), np.matmul(np.swapaxes(h, 1, 2), g_logits), g_logits.sum(axis=1))
            step += 1
            alpha = lr * np.sqrt(1 - BETA_2**step) / (1 - BETA_1**step)
            for i, g in enumerate(grads):
                m[i] += (g - m[i]) * (1 - BETA_1)
                v[i] += (g * g - v[i]) * (1 - BETA_2)
                params[i] -= (m[i] * alpha / (np.sqrt(v[i]) + EPSILON)).astype(np.float32)
    return [[p[j].astype(np.float32) for p in params] for j in range(k)]
