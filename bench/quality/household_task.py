"""The household task (crowdfl's real job): designs per epsilon, customers, ceiling and floor.

Everything comes from the project's own code: `coordinator.task_model.design_task` pretrains on
the manufacturer's lab households and publishes the int8 front and a fresh head; customers are
`crowdfl.household` homes whose windows go through `crowdfl.front.FrontModel` and
`agent.privacy.privatise_features`; held-out features are `coordinator.task_model.clean_features`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from crowdfl import household
from crowdfl.messages import TaskSpec
from crowdfl.task import Samples, task_samples

from .federation import Pool

START = datetime(2026, 9, 1, tzinfo=UTC)
FIRST_HOUR = int(START.timestamp() // 3600)


@dataclass(frozen=True)
class HouseholdSetup:
    customers: int = 20
    history_days: int = 42
    rounds: int = 8
    samples_per_round: int = 96
    validation_households: int = 8
    test_households: int = 12
    hidden_units: int = 48  # room for the edge's class-statistics head: feature_dim x (classes + 1)


@dataclass(frozen=True)
class Design:
    epsilon: float
    spec: TaskSpec
    front_tflite: bytes
    initial: tuple[np.ndarray, ...]
    pretrain_accuracy: float
    seconds: float


@dataclass(frozen=True)
class Homes:
    """Raw samples of a set of homes, with the ground truth an attacker would like to learn."""

    profiles: tuple[household.HouseholdProfile, ...]
    samples: tuple[Samples, ...]
    window_wh: tuple[np.ndarray, ...]  # total energy of each sample's input window (Wh)


def design(epsilon: float, setup: HouseholdSetup, seed: int) -> Design:
    from coordinator.task_model import TaskDesign, design_task

    t0 = time.perf_counter()
    eps = float(epsilon)
    d = design_task(
        TaskDesign(
            rounds=setup.rounds, epsilon=eps, samples_per_round=setup.samples_per_round, seed=seed + 7,
            hidden_units=setup.hidden_units,
            label_epsilon=0.0,  # the sweeps vary the features' epsilon alone; run.run_labels measures label privacy
        ),
        START,
        now=0.0,
    )
    return Design(eps, d.spec, d.front_tflite, tuple(d.initial.weights), d.pretrain_accuracy, time.perf_counter() - t0)


def homes(n: int, seed: int, days: int, spec: TaskSpec) -> Homes:
    generated = household.generate_households(n, seed, START, days, 3600)
    samples = tuple(task_samples(spec, m, FIRST_HOUR) for _, m in generated)
    totals = []
    for (_, m), s in zip(generated, samples, strict=True):
        csum = np.concatenate([[0.0], np.cumsum(np.asarray(m, np.float64).sum(axis=1))])
        end = (s.ids.astype(np.int64) - FIRST_HOUR)  # window end (exclusive), in hours from START
        totals.append(csum[end] - csum[end - spec.window_hours])
    return Homes(tuple(p for p, _ in generated), samples, tuple(totals))


def front_features(d: Design, inputs: np.ndarray) -> np.ndarray:
    """The int8 front on the device (raw, before the normalisation and the noise)."""
    from crowdfl.front import FrontModel

    return FrontModel(d.front_tflite, d.spec.front_model_hash)(inputs)


def clean(d: Design, inputs: np.ndarray) -> np.ndarray:
    from coordinator.task_model import clean_features

    return clean_features(d.front_tflite, d.spec, inputs)


def release_order(n: int, seed: int, i: int) -> np.ndarray:
    """The order in which a device releases its samples (the agent draws fresh ones at random)."""
    return np.random.default_rng([seed, i, 3]).permutation(n)


def noisy_pool(d: Design, h: Homes, seed: int, max_samples: int) -> Pool:
    """Each customer's first `max_samples` releases, noised once by the agent's own function."""
    from agent.privacy import privatise_features, randomised_response

    spec = d.spec
    ids, feats, labels = [], [], []
    for i, s in enumerate(h.samples):
        order = release_order(len(s), seed, i)[:max_samples]
        raw = front_features(d, s.inputs[order])
        feats.append(privatise_features(raw, spec, np.random.default_rng([seed, i, 5])))
        lab = s.labels[order].astype(np.int64)
        labels.append(randomised_response(lab, spec.num_classes, spec.label_epsilon, np.random.default_rng([seed, i, 6])))
        ids.append(f"{i:04d}-{h.profiles[i].household_id}")
    return Pool(tuple(ids), tuple(feats), tuple(labels))


def evaluation_set(d: Design, h: Homes) -> tuple[np.ndarray, np.ndarray]:
    inputs = np.concatenate([s.inputs for s in h.samples])
    labels = np.concatenate([s.labels for s in h.samples]).astype(np.int64)
    return clean(d, inputs), labels


def central_ceiling(d: Design, train: Homes, test: Homes, seed: int, epochs: int = 8) -> float:
    """The whole network (same layers as the task's) trained centrally on raw, noiseless windows.

    Pretrained like the manufacturer's lab model (coordinator.task_model._keras_model), but on
    the customers' own pooled windows: what a manufacturer collecting raw data could reach.
    """
    import keras

    from coordinator.task_model import _keras_model

    keras.utils.set_random_seed(seed)
    x = np.concatenate([s.inputs for s in train.samples])
    y = np.concatenate([s.labels for s in train.samples]).astype(np.int64)
    spec = d.spec
    full, _ = _keras_model(spec.window_hours, x.shape[2], spec.feature_dim, spec.hidden_units, spec.num_classes, spec.clip_l1, 0.0)
    full.compile(optimizer=keras.optimizers.Adam(0.003), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    full.fit(x, y, epochs=epochs, batch_size=64, verbose=0, shuffle=True)
    xt = np.concatenate([s.inputs for s in test.samples])
    yt = np.concatenate([s.labels for s in test.samples]).astype(np.int64)
    return float((full.predict(xt, batch_size=1024, verbose=0).argmax(axis=1) == yt).mean())
