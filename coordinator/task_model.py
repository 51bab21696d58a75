"""Designing a task: the manufacturer's model, split into int8 TFLite front and dense back (TensorFlow).

The manufacturer pretrains the whole network on its own lab households (never on customer data),
keeps the convolutional feature extractor (the *front*) fixed, converts it to a full-int8 TFLite
model for the devices, and publishes the prediction head (the *back*) freshly initialised: the
head is what the crowd trains, on features that only ever leave a home noised.

The front ends in a sigmoid bottleneck of ``feature_dim`` units, so its features already lie in
[0, 1] (the paper's normalisation before the noise), and pretraining injects the devices' own
privacy transform (L1 clip, then Laplace noise at the task's epsilon) behind it. The front thus
learns features that survive the noise: on the generated households at epsilon 4 this lifts the
head's accuracy on noisy features from chance to near the noiseless figure (measured in
``bench/quality``).
"""

from __future__ import annotations

import contextlib
import io
import secrets
import time
from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np

from crowdfl import household
from crowdfl.backmodel import initial_back_weights
from crowdfl.devices import DEVICE_KINDS
from crowdfl.messages import CODEC, ModelWeights, TaskSpec, sha256_hex
from crowdfl.task import Samples, build_samples, laplace_scale, prepare_features, task_samples


@dataclass(frozen=True)
class TaskDesign:
    title: str = "next-6h household consumption class"
    rounds: int = 3
    epsilon: float = 4.0
    label_epsilon: float = 0.0
    clip_l1: float = 1.0
    noise_aware_pretraining: bool = True
    window_hours: int = 24
    horizon_hours: int = 6
    # > window_hours: no two released windows share an hour, so each hour of a household's usage
    # carries epsilon once, and a day is touched by at most two windows: 2 epsilon per day
    # (crowdfl.task.task_spend_bound). 25 and 24 are coprime, so the windows end at every hour of the
    # day in turn; a stride of 24 would end them all at midnight, and the head would learn only to
    # predict the night's consumption. The price is about one sample per household per day.
    window_stride_hours: int = 25
    feature_dim: int = 8
    # = feature_dim x (classes + 1): room for the edge's class-statistics head (edge_server.trainer);
    # with fewer units the edge falls back to Adam, which barely moves on a few dozen daily samples
    hidden_units: int = 40
    samples_per_round: int = 13  # a window every 25 hours: 3 rounds use the 39 windows of a 6-week log
    local_epochs: int = 5
    learning_rate: float = 0.005
    # the rule for rounds the coordinator cannot defend (no root dataset for the task); defended
    # rounds use coordinator/defence.py, whose default was chosen in docs/robustness.md
    aggregation: str = "multi_krum"
    lab_households: int = 12
    lab_days: int = 56
    seed: int = 7
    deadline_s: int = 7 * 86400


@dataclass(frozen=True)
class DesignedTask:
    spec: TaskSpec
    front_tflite: bytes
    initial: ModelWeights
    pretrain_accuracy: float  # the lab model's accuracy on clean lab features (int8 front + lab head)


def _privacy_layer(clip_l1: float, noise_scale: float):  # type: ignore[no-untyped-def]
    """The devices' transform as a Keras layer: L1 clip always, Laplace noise while training."""
    import keras

    class DevicePrivacy(keras.layers.Layer):
        def call(self, x, training=None):  # type: ignore[no-untyped-def]
            norm = keras.ops.sum(keras.ops.abs(x), axis=1, keepdims=True)
            x = x * keras.ops.minimum(1.0, clip_l1 / keras.ops.maximum(norm, 1e-6))
            if training and noise_scale > 0:
                shape = keras.ops.shape(x)
                u1 = keras.random.uniform(shape, 1e-7, 1.0)
                u2 = keras.random.uniform(shape, 1e-7, 1.0)
                x = x + noise_scale * (keras.ops.log(u1) - keras.ops.log(u2))  # Laplace(0, b)
            return x

    return DevicePrivacy(name="device_privacy")


def _keras_model(window: int, channels: int, feature_dim: int, hidden: int, classes: int, clip_l1: float, noise_scale: float):  # type: ignore[no-untyped-def]
    import keras

    inp = keras.Input((window, channels), name="window")
    x = keras.layers.Conv1D(16, 3, activation="relu", padding="same")(inp)
    x = keras.layers.MaxPooling1D(2)(x)
    x = keras.layers.Conv1D(16, 3, activation="relu", padding="same")(x)
    x = keras.layers.MaxPooling1D(2)(x)
    x = keras.layers.Flatten()(x)
    feats = keras.layers.Dense(feature_dim, activation="sigmoid", name="features")(x)
    private = _privacy_layer(clip_l1, noise_scale)(feats)
    h = keras.layers.Dense(hidden, activation="relu")(private)
    out = keras.layers.Dense(classes)(h)
    return keras.Model(inp, out), keras.Model(inp, feats)


def to_int8_tflite(front, representative: np.ndarray) -> bytes:  # type: ignore[no-untyped-def]
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(front)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]

    def rep():  # type: ignore[no-untyped-def]
        for i in range(min(len(representative), 200)):
            yield [representative[i : i + 1].astype(np.float32)]

    conv.representative_dataset = rep
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    with contextlib.redirect_stdout(io.StringIO()):  # the SavedModel export prints every tensor spec
        return bytes(conv.convert())


def lab_samples(design: TaskDesign, start: datetime, input_scale: np.ndarray | None = None,
                edges: np.ndarray | None = None) -> tuple[Samples, np.ndarray, np.ndarray]:
    homes = household.generate_households(design.lab_households, design.seed, start, design.lab_days, 3600)
    hourly = [m for _, m in homes]
    if input_scale is None:
        stacked = np.concatenate(hourly)
        input_scale = np.log1p(np.maximum(np.percentile(stacked, 99, axis=0), 1.0)).astype(np.float32)
    if edges is None:
        totals = np.concatenate([
            np.convolve(m.sum(axis=1), np.ones(design.horizon_hours), "valid") for m in hourly
        ])
        edges = np.percentile(totals, [25, 50, 75]).astype(np.float64)
    first_hour = int(start.timestamp() // 3600)
    parts = [build_samples(m, first_hour, design.window_hours, design.horizon_hours, edges, input_scale) for m in hourly]
    samples = Samples(
        np.concatenate([p.ids for p in parts]),
        np.concatenate([p.inputs for p in parts]),
        np.concatenate([p.labels for p in parts]),
    )
    return samples, input_scale, edges


def design_task(design: TaskDesign, start: datetime, now: float | None = None) -> DesignedTask:
    """Pretrain on lab households, split, quantise the front, and build the TaskSpec."""
    import keras

    from crowdfl.front import FrontModel

    keras.utils.set_random_seed(design.seed)
    samples, input_scale, edges = lab_samples(design, start)
    classes = len(edges) + 1
    noise = laplace_scale(design.epsilon, design.clip_l1, design.feature_dim) if design.noise_aware_pretraining else 0.0
    full, front = _keras_model(
        design.window_hours, samples.inputs.shape[2], design.feature_dim, design.hidden_units, classes, design.clip_l1, noise
    )
    full.compile(optimizer=keras.optimizers.Adam(0.003), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    full.fit(samples.inputs, samples.labels.astype(np.int64), epochs=8, batch_size=64, verbose=0, shuffle=True)
    tflite = to_int8_tflite(front, samples.inputs[np.random.default_rng(design.seed).permutation(len(samples))])
    model_hash = sha256_hex(tflite)
    feature_scale = np.ones(design.feature_dim, np.float32)  # the sigmoid bottleneck is already in [0, 1]
    clip_l1 = design.clip_l1
    clean = prepare_features(FrontModel(tflite, model_hash)(samples.inputs), feature_scale, clip_l1)
    lab_accuracy = float((full.layers[-1](full.layers[-2](clean)).numpy().argmax(axis=1) == samples.labels).mean())
    spec = TaskSpec(
        task_id=secrets.token_hex(32),
        title=design.title,
        rounds=design.rounds,
        epsilon=design.epsilon,
        label_epsilon=design.label_epsilon,
        clip_l1=clip_l1,
        window_hours=design.window_hours,
        horizon_hours=design.horizon_hours,
        window_stride_hours=design.window_stride_hours,
        device_kinds=tuple(DEVICE_KINDS),
        class_edges_wh=edges,
        input_scale=input_scale,
        feature_scale=feature_scale,
        front_model_hash=model_hash,
        initial_model_hash="",
        feature_dim=design.feature_dim,
        hidden_units=design.hidden_units,
        samples_per_round=design.samples_per_round,
        local_epochs=design.local_epochs,
        learning_rate=design.learning_rate,
        aggregation=design.aggregation,
        deadline=int((now if now is not None else time.time()) + design.deadline_s),
    )
    initial = ModelWeights(spec.task_id, 0, tuple(initial_back_weights(spec, design.seed)))
    spec = replace(spec, initial_model_hash=sha256_hex(CODEC.encode(initial)))
    return DesignedTask(spec, tflite, initial, lab_accuracy)


def clean_features(front_tflite: bytes, spec: TaskSpec, inputs: np.ndarray) -> np.ndarray:
    """Held-out evaluation features: the devices' int8 front and normalisation, without noise."""
    from crowdfl.front import FrontModel

    return prepare_features(FrontModel(front_tflite, spec.front_model_hash)(inputs), spec.feature_scale, spec.clip_l1)


@dataclass(frozen=True)
class HeldOutDesign:
    """The manufacturer's own test homes: generated, disjoint from the lab homes (other seed) and
    from every customer, evaluated through the devices' front without noise."""

    homes: int = 8
    seed: int = 424242
    days: int = 42
    start: datetime = household.WORLD_START


# the manufacturer's root homes for FLTrust's server-side reference update (coordinator/reference.py):
# another generated set, disjoint from the lab, the held-out homes and every customer
ROOT_HOMES = HeldOutDesign(homes=12, seed=515151)


def held_out_set(spec: TaskSpec, front_tflite: bytes, design: HeldOutDesign = HeldOutDesign()) -> tuple[np.ndarray, np.ndarray]:
    """(clean features, int64 labels) of the held-out homes, for the coordinator's round evaluation."""
    homes = household.generate_households(design.homes, design.seed, design.start, design.days, 3600)
    first_hour = int(design.start.timestamp() // 3600)
    parts = [task_samples(spec, m, first_hour) for _, m in homes]
    inputs = np.concatenate([p.inputs for p in parts])
    labels = np.concatenate([p.labels for p in parts]).astype(np.int64)
    return clean_features(front_tflite, spec, inputs), labels
