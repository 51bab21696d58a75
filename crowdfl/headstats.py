"""The class-statistics head, in numpy: the rule the edge trains a task's head with when it has
room for it (``edge_server/trainer.py`` runs the same rule in TensorFlow), and the rule the
coordinator trains its FLTrust reference update with (``coordinator/reference.py``), so that an
honest edge's update and the reference come from one procedure and their cosine measures the data,
not a difference of trainers. The helpers here (room for the rule, the product units' shift, the
label channel, the fine-tuning pull) are shared by all three. Pure, no I/O.

The head (hidden ≥ d (c + 1)): the first d hidden units copy the (noisy) features, the next c·d
are product units carrying each class's mean; the output layer is the nearest-class-mean rule on
them (Duchi, Jordan & Wainwright 2013: class means are what Laplace-noised features estimate
without bias), then fine-tuned by full-batch Adam pulled towards it in proportion to the known
noise variance (L2-SP, Li et al. 2018).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .backmodel import check_back_weights
from .messages import TaskSpec
from .task import laplace_scale

FINETUNE_STEPS = 50
FINETUNE_LR = 0.005
FINETUNE_PULL = 0.1  # L2-SP weight per unit of noise variance 2 b^2
BETA_1, BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7  # Keras Adam defaults


def statistics_head_fits(spec: TaskSpec) -> bool:
    """Whether the task's head has room for the class-mean rule (see the module docstring)."""
    return spec.hidden_units >= spec.feature_dim * (spec.num_classes + 1)


def product_shift(spec: TaskSpec) -> float:
    """The shift s of the product units: keeps mean + s positive, even for one noisy sample."""
    b = laplace_scale(spec.epsilon, spec.clip_l1, spec.feature_dim) if math.isfinite(spec.epsilon) else 0.0
    return 1.0 + 4.0 * math.sqrt(2.0) * b


def label_channel(spec: TaskSpec) -> tuple[float, float] | None:
    """(keep, flip) probabilities of the task's k-ary randomised response, or None for clear labels:
    a released label is the true one with probability keep, each other class with probability flip."""
    if not spec.label_epsilon > 0:
        return None
    e = math.exp(spec.label_epsilon)
    k = spec.num_classes
    return e / (e + k - 1), 1.0 / (e + k - 1)


def finetune_pull(spec: TaskSpec) -> float:
    """The L2-SP weight towards the statistics head: proportional to the noise variance 2 b^2."""
    b = laplace_scale(spec.epsilon, spec.clip_l1, spec.feature_dim) if math.isfinite(spec.epsilon) else 0.0
    return FINETUNE_PULL * 2.0 * b * b


def channel_matrix(spec: TaskSpec) -> np.ndarray:
    keep, flip = label_channel(spec) or (1.0, 0.0)
    c = spec.num_classes
    return (np.full((c, c), flip) + np.eye(c) * (keep - flip)).astype(np.float32)


def finetune_masks(spec: TaskSpec) -> list[np.ndarray]:
    """1 where fine-tuning may move a weight: the output layer's rows from the feature-copying
    units, and its bias. The first layer stays the identity (so clean features, which are much
    smaller than noisy ones, can never fall below a ReLU threshold learnt on noisy inputs), and the
    product units stay exact."""
    d, h, c = spec.feature_dim, spec.hidden_units, spec.num_classes
    rows = np.zeros(h, np.float32)
    rows[:d] = 1.0
    return [np.zeros((d, h), np.float32), np.zeros(h, np.float32), np.broadcast_to(rows[:, None], (h, c)).copy(), np.ones(c, np.float32)]


def class_means_of(weights: Sequence[np.ndarray], spec: TaskSpec) -> np.ndarray | None:
    """The class means a statistics-layout head carries in its (frozen) product units, or None for
    a head of another layout. On an aggregate they are the average of the customers' means."""
    d, c = spec.feature_dim, spec.num_classes
    if not statistics_head_fits(spec):
        return None
    w1, b1 = np.asarray(weights[0]), np.asarray(weights[1], np.float64)
    if np.abs(w1[:, d : d + c * d]).max(initial=0.0) > 1e-6:
        return None
    means = b1[d : d + c * d].reshape(c, d) - product_shift(spec)
    if not (means > -product_shift(spec)).all():
        return None
    return means


def statistics_head(global_weights: Sequence[np.ndarray], features: np.ndarray, labels: np.ndarray, spec: TaskSpec) -> list[np.ndarray]:
    """The class-statistics head fitted to (features, labels) and fine-tuned, from ``global_weights``
    (whose product units give the class means for classes these samples lack)."""
    if not statistics_head_fits(spec):
        raise ValueError(f"a head of {spec.hidden_units} units has no room for the class-statistics rule")
    check_back_weights(global_weights, spec)
    if len(labels) == 0:
        raise ValueError("no samples to train on")
    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    d, h, c = spec.feature_dim, spec.hidden_units, spec.num_classes
    counts = np.bincount(y, minlength=c).astype(np.float64)
    sums = np.zeros((c, d))
    np.add.at(sums, y, x)
    channel = label_channel(spec)
    if channel is not None:  # un-mix the randomised labels, as the edge does
        keep, flip = channel
        counts = (counts - flip * counts.sum()) / (keep - flip)
        sums = (sums - flip * sums.sum(axis=0, keepdims=True)) / (keep - flip)
        counts = np.where(counts > 0.5, counts, 0.0)
    fallback = class_means_of(global_weights, spec)
    if fallback is None:
        fallback = np.broadcast_to(x.mean(axis=0), (c, d))
    mu = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1.0)[:, None], fallback)
    s = product_shift(spec)
    w1 = np.eye(d, h)
    b1 = np.zeros(h)
    w2 = np.zeros((h, c))
    w2[:d] = mu.T
    for k in range(c):
        rows = d + k * d + np.arange(d)
        b1[rows] = mu[k] + s
        w2[rows, k] = -0.5 * (mu[k] - s)
    start = [w1.astype(np.float32), b1.astype(np.float32), w2.astype(np.float32), np.zeros(c, np.float32)]
    return _finetune(start, np.asarray(features, np.float32), y, spec)


def _finetune(start: list[np.ndarray], x: np.ndarray, y: np.ndarray, spec: TaskSpec) -> list[np.ndarray]:
    """Full-batch Adam from the statistics head, pulled towards it, product units frozen: as the
    edge does it, a logistic regression on relu(x) for the output rows of the feature-copying units
    and the output bias (the only weights `finetune_masks` lets move; the product units add a
    fixed bias per class)."""
    d = spec.feature_dim
    w1, b1, w2, b2 = start
    pull = np.float32(finetune_pull(spec))
    mix = channel_matrix(spec) if label_channel(spec) is not None else None
    hx = np.maximum(x, np.float32(0.0))
    fixed = (np.maximum(b1[d:], 0.0) @ w2[d:]).astype(np.float32)
    p0 = [w2[:d].copy(), b2.copy()]
    params = [q.copy() for q in p0]
    m = [np.zeros_like(q) for q in params]
    v = [np.zeros_like(q) for q in params]
    n = len(y)
    for step in range(1, FINETUNE_STEPS + 1):
        logits = hx @ params[0] + fixed + params[1]
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        if mix is None:
            p[np.arange(n), y] -= 1.0
            g_logits = p / n
        else:  # d/dlogits of -log((p M)_y) = -p (M[:, y] - r) / r, r = (p M)_y
            col = mix[:, y].T
            r = (p * col).sum(axis=1, keepdims=True) + np.float32(1e-12)
            g_logits = (-p * (col - r) / r / n).astype(np.float32)
        grads = (hx.T @ g_logits, g_logits.sum(axis=0))
        alpha = np.float32(FINETUNE_LR * np.sqrt(1 - BETA_2**step) / (1 - BETA_1**step))
        for i, g in enumerate(grads):
            g = (g + pull * (params[i] - p0[i])).astype(np.float32)
            m[i] += (g - m[i]) * np.float32(1 - BETA_1)
            v[i] += (g * g - v[i]) * np.float32(1 - BETA_2)
            params[i] = (params[i] - alpha * m[i] / (np.sqrt(v[i]) + np.float32(ADAM_EPSILON))).astype(np.float32)
    return [w1, b1, np.concatenate([params[0], w2[d:]]).astype(np.float32), params[1]]
