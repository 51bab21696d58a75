"""A numpy mirror of `edge_server.trainer.train_customer`, for sweeps of thousands of trainings.

`train_customer` builds, compiles and traces a fresh Keras model on every call: about 0.8 s of
fixed cost for a head of a few hundred parameters, which would make the attack grid (192 runs x
rounds x customers) take hours. This mirror does the same arithmetic (Dense-ReLU-Dense from the
global weights, sparse categorical cross-entropy on logits averaged over the batch, Keras 3's
Adam with its default betas and epsilon, batch 32 reshuffled every epoch, `spec.local_epochs`
epochs at `spec.learning_rate`) in a few milliseconds. Shuffling draws differ from TensorFlow's,
so results match in distribution, not bit for bit; `run.run_trainer_check` measures the gap in each
run of the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crowdfl.backmodel import check_back_weights
from crowdfl.messages import TaskSpec
from edge_server.store import CustomerData

BATCH = 32  # as edge_server/trainer.py
BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7  # keras.optimizers.Adam defaults


def train_numpy(global_weights: Sequence[np.ndarray], data: CustomerData, spec: TaskSpec, seed: int) -> list[np.ndarray]:
    """Local epochs of Adam on the customer's noisy features, from the round's global model."""
    check_back_weights(global_weights, spec)
    if len(data.labels) == 0:
        raise ValueError("no samples to train on")
    x_all = np.asarray(data.features, np.float32)
    y_all = np.asarray(data.labels, np.int64)
    params = [np.array(w, dtype=np.float32) for w in global_weights]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    rng = np.random.default_rng(seed)
    lr = np.float32(spec.learning_rate)
    n = len(y_all)
    step = 0
    for _ in range(spec.local_epochs):
        order = rng.permutation(n)
        for start in range(0, n, BATCH):
            idx = order[start : start + BATCH]
            x, y = x_all[idx], y_all[idx]
            w1, b1, w2, b2 = params
            pre = x @ w1 + b1
            h = np.maximum(pre, 0.0)
            logits = h @ w2 + b2
            logits = logits - logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(y)), y] -= 1.0
            g_logits = p / len(y)
            g_w2 = h.T @ g_logits
            g_b2 = g_logits.sum(axis=0)
            g_h = (g_logits @ w2.T) * (pre > 0)
            g_w1 = x.T @ g_h
            g_b1 = g_h.sum(axis=0)
            step += 1
            alpha = lr * np.sqrt(1 - BETA_2**step) / (1 - BETA_1**step)
            for i, g in enumerate((g_w1, g_b1, g_w2, g_b2)):
                m[i] += (g - m[i]) * (1 - BETA_1)
                v[i] += (g * g - v[i]) * (1 - BETA_2)
                params[i] -= (m[i] * alpha / (np.sqrt(v[i]) + EPSILON)).astype(np.float32)
    return [p.astype(np.float32) for p in params]


def train_keras(global_weights: Sequence[np.ndarray], data: CustomerData, spec: TaskSpec, seed: int) -> list[np.ndarray]:
    """The edge server's own trainer (TensorFlow)."""
    from edge_server.trainer import train_customer

    return train_customer(global_weights, data, spec, seed).weights
