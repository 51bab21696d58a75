"""Per-customer training of the dense layers on that customer's noisy features (TensorFlow).

Why not gradient descent. Every released feature carries Laplace noise of known scale
b = sensitivity / epsilon per coordinate (variance 2b^2; at epsilon = 2 on the digits task that
is 2.0 against a signal of ~0.1 per coordinate). Training a network by SGD on such inputs is
training with input noise, which acts as a Tikhonov penalty proportional to the noise variance
(Bishop 1995, "Training with noise is equivalent to Tikhonov regularization"): the gradient signal
drowns, and the head sits on a plateau (0.689 on digits at epsilon = 2 while the released data
allow 0.928, docs/quality.md). What the noise leaves intact are low-order statistics: the noise
is zero-mean and independent of the label, so a class's mean of noisy features is an unbiased
estimate of its clean mean, and averaging noisy reports is the minimax-optimal way to estimate a
mean under local differential privacy (Duchi, Jordan & Wainwright 2018, "Minimax optimal
procedures for locally private estimation", JASA). The classifier built on those means is the
nearest-class-mean rule (Mensink et al. 2013, TPAMI; linear discriminant analysis with a shared
isotropic covariance, Hastie, Tibshirani & Friedman, ESL section 4.3), which only needs them.

So the edge fits the head in closed form from the customer's class sums and counts (all its
released samples: the largest possible batch) and writes the nearest-class-mean rule into the
task's Dense-ReLU-Dense layers:

* hidden units 0..d-1 copy the features (W1 = identity, bias 0): released and held-out features
  are in [0, 1] after ``crowdfl.task.prepare_features``, so the ReLU is the identity on them;
  ``W2[:d, k] = mu_k``;
* the rule also needs -|mu_k|^2 / 2 per class, which is quadratic in the means, and the
  coordinator aggregates weights linearly; averaged per-customer squares would carry each
  customer's own noise (useless at a few samples per class), and a square taken from last round's
  model does not match this round's means (measured: 0.76 instead of 0.92 on digits at
  epsilon = 2). So the square is stored as a product of two weights, each linear in the means:
  hidden unit ``d + k d + m`` has bias ``mu_k[m] + s`` and outgoing weight ``-(mu_k[m] - s) / 2``
  to class k (a constant input: W1 column 0). Averaging both over customers and multiplying in
  the forward pass gives exactly -(|mean mu_k|^2 - d s^2) / 2 for the averaged means, i.e. the
  pooled nearest-class-mean rule (a shift s > 0 keeps the units' input positive through the ReLU;
  -d s^2 / 2 is the same for every class).

The class-mean rule assumes classes share an isotropic spread, which real features do not. So the
head is then fine-tuned from that initialisation by ``FINETUNE_STEPS`` full-batch Adam steps on the
customer's released samples (the whole batch: the gradient's noise is averaged over every sample,
not a mini-batch), regularised towards the statistics head with a weight proportional to the
known noise variance 2b^2 ("L2-SP", Li, Grandvalet & Davoine 2018, "Explicit inductive bias for
transfer learning"): at small epsilon the statistics dominate, without noise the data do. Only the
output layer moves (a logistic regression on the features, started at the class-mean rule): the
product units stay frozen so the aggregate's class-mean bias stays exact, and the first layer stays
the identity, because a ReLU threshold learnt on noisy inputs can silence every unit on the much
smaller clean features (seen in the end-to-end demo: one class predicted for all). docs/quality.md ("Over
seeds") compares this trainer with the Adam-from-scratch procedure it replaced, per seed.

Labels released with k-ary randomised response (``label_epsilon > 0``) pass through a known
channel M (keep e^eps / (e^eps + k - 1), each other class 1 / (e^eps + k - 1)): the class sums and
counts are un-mixed with M's inverse (unbiased, like the means), and the fine-tuning uses the
forward-corrected loss -log (softmax(logits) M)_y (Patrini et al. 2017, "Making deep neural
networks robust to label noise: a loss correction approach").

It needs ``hidden_units >= feature_dim * (num_classes + 1)``. A task with fewer hidden units gets
the previous procedure (minibatch Adam on the noisy features from the round's global model), in
numpy (``crowdfl.headtrain.adam_head``, the coordinator's FLTrust reference runs the same function). The model and its ``tf.function`` are built once per task
(`HeadTrainer`) and reused for every customer and round: only the data change.

Training reuses the noisy features as released; it costs no privacy (post-processing).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crowdfl.backmodel import check_back_weights
from crowdfl.headstats import (  # the numpy rule and its helpers, shared with the coordinator's reference
    ADAM_EPSILON, BETA_1, BETA_2, FINETUNE_LR, FINETUNE_STEPS, class_means_of, finetune_pull,
    label_channel, product_shift, statistics_head_fits,
)
from crowdfl.headstats import channel_matrix as _channel_matrix
from crowdfl.headtrain import adam_head, head_loss
from crowdfl.messages import TaskSpec

from .store import CustomerData


@dataclass(frozen=True)
class TrainResult:
    weights: list[np.ndarray]
    loss: float
    seconds: float
    num_samples: int
    inputs_digest: str


def inputs_digest(data: CustomerData) -> str:
    """sha256 over the sample ids and features used: ties an update to the data behind it."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.sample_ids, dtype="<u8").tobytes())
    h.update(np.ascontiguousarray(data.features, dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(data.labels, dtype="<i8").tobytes())
    return h.hexdigest()


class HeadTrainer:
    """The edge's trainer for one task: built once, then ``train`` per customer and round."""

    def __init__(self, spec: TaskSpec, finetune_steps: int = FINETUNE_STEPS) -> None:
        import tensorflow as tf

        self.spec = spec
        self.statistics = statistics_head_fits(spec)
        d, h, c = spec.feature_dim, spec.hidden_units, spec.num_classes
        if self.statistics:
            shift = product_shift(spec)
            eye_c = tf.constant(np.eye(c), tf.float64)
            w1 = tf.constant(np.eye(d, h), tf.float32)  # identity on the first d units, zero elsewhere

            channel = label_channel(spec)
            mix = tf.constant(_channel_matrix(spec), tf.float32) if channel is not None else None
            pull = tf.constant(finetune_pull(spec), tf.float32)

            def fit(x: Any, y: Any, fallback: Any) -> Any:
                xs = tf.cast(x, tf.float64)
                counts = tf.math.unsorted_segment_sum(tf.ones_like(y, tf.float64), y, c)
                sums = tf.math.unsorted_segment_sum(xs, y, c)
                if channel is not None:  # un-mix the randomised labels: E[noisy stats] = M (true stats)
                    keep, flip = channel
                    counts = (counts - flip * tf.reduce_sum(counts)) / (keep - flip)
                    sums = (sums - flip * tf.reduce_sum(sums, axis=0, keepdims=True)) / (keep - flip)
                    counts = tf.where(counts > 0.5, counts, tf.zeros_like(counts))
                mu = tf.where(counts[:, None] > 0, sums / tf.maximum(counts, 1.0)[:, None], fallback)
                b1 = tf.concat([tf.zeros([d], tf.float64), tf.reshape(mu + shift, [-1]), tf.zeros([h - d - c * d], tf.float64)], 0)
                block = tf.reshape((-0.5 * (mu - shift))[:, :, None] * eye_c[:, None, :], [c * d, c])
                w2 = tf.concat([tf.transpose(mu), block, tf.zeros([h - d - c * d, c], tf.float64)], 0)
                w2 = tf.cast(w2, tf.float32)
                # Only the output layer's rows from the feature-copying units and its bias move
                # (finetune_masks), so the fine-tuning is a logistic regression on relu(x): the
                # product units are constants (relu(mu + s) = mu + s > 0) adding a fixed bias per
                # class, the other units are 0. Training the d x c weights and c biases alone is the
                # same arithmetic as the masked full-head Adam (a masked weight has zero gradient,
                # zero moments and never moves), without the n x h hidden layer in every step.
                hx = tf.nn.relu(x)
                fixed = tf.cast(tf.reduce_sum((mu + shift) * (-0.5 * (mu - shift)), axis=1), tf.float32)
                start = [w2[:d], tf.zeros([c], tf.float32)]

                def loss_of(ps: list[Any]) -> Any:
                    logits = hx @ ps[0] + fixed + ps[1]
                    if channel is None:
                        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
                    # forward loss correction for the known label channel (Patrini et al. 2017)
                    noisy = tf.nn.softmax(logits) @ mix
                    return -tf.reduce_mean(tf.math.log(tf.gather(noisy, y, batch_dims=1) + 1e-12))

                def step(t: Any, ps: list[Any], ms: list[Any], vs: list[Any]) -> Any:
                    with tf.GradientTape() as tape:
                        tape.watch(ps)
                        loss = loss_of(ps)
                    grads = tape.gradient(loss, ps)
                    tf_t = tf.cast(t, tf.float32)
                    alpha = FINETUNE_LR * tf.sqrt(1.0 - BETA_2**tf_t) / (1.0 - BETA_1**tf_t)
                    new_p, new_m, new_v = [], [], []
                    for p, p0, g, m, v in zip(ps, start, grads, ms, vs, strict=True):
                        g = g + pull * (p - p0)
                        m = m + (g - m) * (1.0 - BETA_1)
                        v = v + (g * g - v) * (1.0 - BETA_2)
                        new_m.append(m)
                        new_v.append(v)
                        new_p.append(p - alpha * m / (tf.sqrt(v) + ADAM_EPSILON))
                    return t + 1, new_p, new_m, new_v

                zeros = [tf.zeros_like(p) for p in start]
                _, ps, _, _ = tf.while_loop(
                    lambda t, *_: t <= finetune_steps, step, (tf.constant(1), start, zeros, list(zeros))
                )
                out_w = tf.concat([ps[0], w2[d:]], 0)
                return w1, tf.cast(b1, tf.float32), out_w, ps[1], loss_of(ps)

            self._fit = tf.function(
                fit,
                input_signature=[
                    tf.TensorSpec([None, d], tf.float32),
                    tf.TensorSpec([None], tf.int32),
                    tf.TensorSpec([c, d], tf.float64),
                ],
                reduce_retracing=True,
            )
    def train(self, global_weights: Sequence[np.ndarray], data: CustomerData, seed: int) -> TrainResult:
        spec = self.spec
        check_back_weights(global_weights, spec)
        if len(data.labels) == 0:
            raise ValueError("no samples to train on")
        labels = np.asarray(data.labels, np.int64)
        if labels.min() < 0 or labels.max() >= spec.num_classes:
            raise ValueError(f"labels outside 0..{spec.num_classes - 1}")
        x = np.asarray(data.features, np.float32)
        t0 = time.perf_counter()
        if self.statistics:
            # a class this customer never released keeps the round's global estimate (or, on a
            # head of another layout, the customer's overall mean): it adds no information
            fallback = class_means_of(global_weights, spec)
            if fallback is None:
                fallback = np.broadcast_to(x.astype(np.float64).mean(axis=0), (spec.num_classes, spec.feature_dim))
            *ws, loss = self._fit(x, labels.astype(np.int32), np.ascontiguousarray(fallback))
            weights = [np.asarray(w, np.float32) for w in ws]
            loss_value = float(loss)
        else:
            # a head too small for the statistics rule: minibatch Adam from the round's global model,
            # the arithmetic Keras' fit did, in numpy (crowdfl/headtrain.py; Keras' per-call set-up
            # cost 0.54 s per customer against 1.5 ms for this, issue 16)
            weights = adam_head(global_weights, x, labels, spec, seed)
            loss_value = head_loss(weights, x, labels)
        return TrainResult(weights, loss_value, time.perf_counter() - t0, len(labels), inputs_digest(data))


def train_customer(global_weights: Sequence[np.ndarray], data: CustomerData, spec: TaskSpec, seed: int) -> TrainResult:
    """One training with a trainer built for the occasion (the service keeps one per task)."""
    return HeadTrainer(spec).train(global_weights, data, seed)
