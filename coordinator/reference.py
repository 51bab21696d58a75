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

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crowdfl.headstats import statistics_head, statistics_head_fits
from crowdfl.messages import TaskSpec
from crowdfl.task import laplace_scale

# the numpy Adam now lives in the core, shared with the edge's trainer (re-exported here)
from crowdfl.headtrain import BATCH, BETA_1, BETA_2, EPSILON, adam_head  # noqa: E402,F401


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
    """The head trained from ``global_weights`` on (the first ``samples`` of) the root data, by the
    rule an honest edge trains the task's head with: the class-statistics head when the task has
    room for it (``crowdfl.headstats``, as ``edge_server.trainer`` does), else local epochs of Adam.
    An Adam reference beside class-statistics updates scores honest customers by the difference of
    the two procedures, not by their data (measured: bench/quality/robustness.py's defended control
    fell from 0.55 to 0.48 ± 0.22 when the default task moved to the statistics head)."""
    x_all = root.features if samples is None else root.features[:samples]
    y_all = root.labels if samples is None else root.labels[:samples]
    if len(y_all) == 0:
        raise ValueError("empty root dataset")
    if statistics_head_fits(spec):
        # the root labels are the manufacturer's own, in clear: nothing to un-mix
        clear = dataclasses.replace(spec, label_epsilon=0.0) if spec.label_epsilon > 0 else spec
        return statistics_head(global_weights, np.asarray(x_all, np.float32), np.asarray(y_all, np.int64), clear)
    return adam_head(global_weights, np.asarray(x_all, np.float32), np.asarray(y_all, np.int64), spec, seed)
