"""The task's deeper (dense) layers: trained at the edge, aggregated by the coordinator.

Weights are the list ``[W1 (d, h), b1 (h,), W2 (h, c), b2 (c,)]`` in float32. The forward pass is
numpy so the coordinator can evaluate and audit without TensorFlow; ``keras_back`` builds the same
layers for training (TensorFlow is imported only there, never by the agent).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .messages import TaskSpec


def back_shapes(spec: TaskSpec) -> list[tuple[int, ...]]:
    d, h, c = spec.feature_dim, spec.hidden_units, spec.num_classes
    return [(d, h), (h,), (h, c), (c,)]


def initial_back_weights(spec: TaskSpec, seed: int) -> list[np.ndarray]:
    """Glorot-uniform kernels and zero biases, as Keras initialises Dense layers."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for shape in back_shapes(spec):
        if len(shape) == 2:
            limit = np.sqrt(6.0 / (shape[0] + shape[1]))
            out.append(rng.uniform(-limit, limit, size=shape).astype(np.float32))
        else:
            out.append(np.zeros(shape, np.float32))
    return out


def check_back_weights(weights: Sequence[np.ndarray], spec: TaskSpec) -> None:
    shapes = [tuple(w.shape) for w in weights]
    if shapes != back_shapes(spec):
        raise ValueError(f"weight shapes {shapes} are not the task's {back_shapes(spec)}")
    for i, w in enumerate(weights):
        if w.dtype != np.float32:
            raise ValueError(f"weight {i} has dtype {w.dtype}, expected float32")
        if not np.isfinite(w).all():
            raise ValueError(f"weight {i} has NaN or Inf")


def back_logits(weights: Sequence[np.ndarray], features: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = weights
    hidden = np.maximum(features @ w1 + b1, 0.0)
    return hidden @ w2 + b2


def accuracy(weights: Sequence[np.ndarray], features: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((back_logits(weights, features).argmax(axis=1) == labels).mean())


def keras_back(spec: TaskSpec) -> Any:
    """A Keras model of the dense layers (imports TensorFlow/Keras)."""
    import keras

    inp = keras.Input((spec.feature_dim,), name="features")
    h = keras.layers.Dense(spec.hidden_units, activation="relu", name="dense_hidden")(inp)
    out = keras.layers.Dense(spec.num_classes, name="logits")(h)
    return keras.Model(inp, out, name="back")
