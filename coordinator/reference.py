"""The server-side reference update of FLTrust (Cao et al., NDSS 2021), on the manufacturer's data.

The coordinator trains the task's head from the round's global model on a *root dataset*: the
manufacturer's own households (never customer data), passed through the same int8 front and the
same Laplace noise as a device's features, so that the reference points where an honest
customer's update points. The training is the edge's (Dense-ReLU-Dense, sparse cross-entropy on
logits, Keras' Adam defaults, batch 32, ``spec.local_epochs`` at ``spec.learning_rate``), written
in numpy so the coordinator needs no TensorFlow and the result is a deterministic function of
(global model, root data, spec, seed): whoever holds the root data can re-run it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crowdfl.backmodel import check_back_weights
from crowdfl.messages import TaskSpec
from crowdfl.task import laplace_scale

BATCH = 32
BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7  # keras.optimizers.Adam defaults


@dataclass(frozen=True)
class RootData:
    """The manufacturer's root dataset for a task: features as a device would send them."""

    features: np.ndarray
    labels: np.ndarray

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.features, dtype="<f4").tobytes())
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        return h.hexdigest()


def root_data(clean_features: np.ndarray, labels: np.ndarray, spec: TaskSpec, seed: int) -> RootData:
    """Noise the manufacturer's clean features as a device would (L1-clipped features + Laplace at
    the task's epsilon), with a fixed seed so the root dataset is reproducible."""
    x = np.asarray(clean_features, np.float32)
    if np.isfinite(spec.epsilon):
        scale = laplace_scale(spec.epsilon, spec.clip_l1, spec.feature_dim)
        x = (x + np.random.default_rng([seed, 17]).laplace(0.0, scale, x.shape)).astype(np.float32)
    return RootData(x, np.asarray(labels, np.int64))


def reference_model(
    global_weights: Sequence[np.ndarray], root: RootData, spec: TaskSpec, seed: int, samples: int | None = None
) -> list[np.ndarray]:
    """The head trained from ``global_weights`` on (the first ``samples`` of) the root data."""
    x_all = root.features if samples is None else root.features[:samples]
    y_all = root.labels if samples is None else root.labels[:samples]
    if len(y_all) == 0:
        raise ValueError("empty root dataset")
    return adam_head(global_weights, np.asarray(x_all, np.float32), np.asarray(y_all, np.int64), spec, seed)


def adam_head(global_weights: Sequence[np.ndarray], x_all: np.ndarray, y_all: np.ndarray, spec: TaskSpec, seed: int) -> list[np.ndarray]:
    """Local epochs of minibatch Adam (Keras' defaults, batch 32, reshuffled each epoch) on
    Dense-ReLU-Dense with sparse cross-entropy on logits, from ``global_weights``. Also the numpy
    mirror of the edge's Adam fallback in bench/quality/fasttrain.py."""
    check_back_weights(global_weights, spec)
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
            g_h = (g_logits @ w2.T) * (pre > 0)
            grads = (x.T @ g_h, g_h.sum(axis=0), h.T @ g_logits, g_logits.sum(axis=0))
            step += 1
            alpha = lr * np.sqrt(1 - BETA_2**step) / (1 - BETA_1**step)
            for i, g in enumerate(grads):
                m[i] += (g - m[i]) * (1 - BETA_1)
                v[i] += (g * g - v[i]) * (1 - BETA_2)
                params[i] -= (m[i] * alpha / (np.sqrt(v[i]) + EPSILON)).astype(np.float32)
    return [p.astype(np.float32) for p in params]
