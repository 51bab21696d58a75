"""The paper's experiment on handwritten digits: scikit-learn's 8x8 digits as the MNIST stand-in.

No MNIST ships in any installable package (see /work/shared/dependency-notes.md), so the
1,797 8x8 digits of `sklearn.datasets.load_digits` stand in. The network is split as the papers
split it: convolutions (and the bottleneck) on the device, run as an int8 TFLite model by
`crowdfl.front.FrontModel`; the dense layers at the edge, trained by the edge's trainer and
aggregated by the coordinator. What differs per variant is what sits between the two:

* ``paper``: a sigmoid bottleneck, then `crowdfl.task.prepare_features` (box-clip to [0, 1],
  L1-clip to `clip_l1`): the paper's normalisation before the noise, which bounds the L1
  sensitivity by min(2 clip_l1, d);
* ``batchnorm``: batch normalisation instead (mapped to [0, 1] at +-3 standard deviations and
  box-clipped, since the noise needs *some* bound); no L1 bound, so the sensitivity is d;
* ``none``: a linear bottleneck mapped to [0, 1] by one global bound from the lab data
  (x / 2B + 1/2), box-clipped; sensitivity d;
* ``paper_noise_aware``: the paper's normalisation, with the front then fine-tuned with the
  device's noise injected, as `coordinator.task_model.design_task` does for the household task
  (the other variants are pretrained on clean lab images only).

The manufacturer pretrains on its own lab split, customers hold a disjoint split, the
manufacturer's validation split is for choices, the test split only for the reported figures.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from crowdfl.backmodel import initial_back_weights
from crowdfl.messages import TaskSpec
from crowdfl.task import laplace_scale

from .federation import Pool

VARIANTS = ("paper", "batchnorm", "none", "paper_noise_aware")
BN_SPAN = 3.0  # batch-normalised features are mapped to [0, 1] over +-BN_SPAN standard deviations


@dataclass(frozen=True)
class DigitsSetup:
    customers: int = 10
    rounds: int = 5
    feature_dim: int = 10
    hidden_units: int = 64
    clip_l1: float = 1.0
    local_epochs: int = 5
    learning_rate: float = 0.005
    pretrain_epochs: int = 30
    finetune_epochs: int = 30
    test_fraction: float = 0.3
    lab_fraction: float = 0.25
    validation_fraction: float = 0.1


@dataclass(frozen=True)
class Split:
    lab: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    customers: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DigitsFront:
    variant: str
    epsilon: float
    spec: TaskSpec
    front_tflite: bytes
    initial: tuple[np.ndarray, ...]
    lab_accuracy: float  # the pretrained network, float, on clean lab images
    lab_test_accuracy: float  # the same network on the test images: the manufacturer alone
    seconds: float


def load_split(setup: DigitsSetup, seed: int) -> Split:
    """Stratified, disjoint lab / validation / customers / test splits of sklearn's digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=setup.test_fraction, stratify=y, random_state=seed)
    rest = 1.0 - setup.test_fraction
    x_lab, x_rest, y_lab, y_rest = train_test_split(x_rest, y_rest, train_size=setup.lab_fraction / rest, stratify=y_rest, random_state=seed + 1)
    rest -= setup.lab_fraction
    x_val, x_cust, y_val, y_cust = train_test_split(x_rest, y_rest, train_size=setup.validation_fraction / rest, stratify=y_rest, random_state=seed + 2)
    return Split((x_lab, y_lab), (x_val, y_val), (x_cust, y_cust), (x_test, y_test))


def _spec(variant: str, epsilon: float, setup: DigitsSetup, clip: float) -> TaskSpec:
    return TaskSpec(
        task_id="d1617" + "0" * 59,
        title=f"digits ({variant})",
        rounds=setup.rounds,
        epsilon=float(epsilon),
        label_epsilon=0.0,
        clip_l1=clip,
        window_hours=8,
        horizon_hours=1,
        device_kinds=("pixels",),
        class_edges_wh=np.arange(9, dtype=np.float64),  # 10 classes
        input_scale=np.ones(1, np.float32),
        feature_scale=np.ones(setup.feature_dim, np.float32),
        front_model_hash="",
        initial_model_hash="",
        feature_dim=setup.feature_dim,
        hidden_units=setup.hidden_units,
        samples_per_round=1,
        local_epochs=setup.local_epochs,
        learning_rate=setup.learning_rate,
        aggregation="fedavg",
        deadline=0,
    )


def _device_transform(clip_l1: float):  # type: ignore[no-untyped-def]
    """prepare_features (features already scaled) + Laplace noise, as a Keras layer.

    The noise scale is a variable so that one pretrained network is fine-tuned for each epsilon;
    noise is added only while training.
    """
    import keras

    class DeviceTransform(keras.layers.Layer):
        def build(self, input_shape):  # type: ignore[no-untyped-def]
            self.noise_scale = self.add_weight(shape=(), initializer="zeros", trainable=False, name="noise_scale")

        def call(self, x, training=None):  # type: ignore[no-untyped-def]
            x = keras.ops.clip(x, 0.0, 1.0)
            norm = keras.ops.sum(keras.ops.abs(x), axis=1, keepdims=True)
            x = x * keras.ops.minimum(1.0, clip_l1 / keras.ops.maximum(norm, 1e-6))
            if training:
                shape = keras.ops.shape(x)
                u1 = keras.random.uniform(shape, 1e-7, 1.0)
                u2 = keras.random.uniform(shape, 1e-7, 1.0)
                x = x + self.noise_scale * (keras.ops.log(u1) - keras.ops.log(u2))
            return x

    return DeviceTransform(name="device_transform")


def _front_layers(variant: str, d: int):  # type: ignore[no-untyped-def]
    """Convolutions and the bottleneck; for "none" the bottleneck is linear (scaled later)."""
    import keras

    inp = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(32, 3, activation="relu", padding="same")(inp)
    x = keras.layers.Conv2D(32, 3, activation="relu", padding="same")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(64, 3, activation="relu", padding="same")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    if variant.startswith("paper"):
        feats = keras.layers.Dense(d, activation="sigmoid", name="features")(x)
    elif variant == "batchnorm":
        x = keras.layers.Dense(d, name="bottleneck")(x)
        x = keras.layers.BatchNormalization(name="bn")(x)
        feats = keras.layers.Rescaling(1.0 / (2 * BN_SPAN), offset=0.5, name="features")(x)
    else:
        feats = keras.layers.Dense(d, name="features")(x)
    return inp, feats


def design_fronts(variant: str, epsilons: Sequence[float], setup: DigitsSetup, split: Split, seed: int) -> list[DigitsFront]:
    """The manufacturer's side: pretrain on the lab split, then per epsilon fine-tune with the
    device transform's noise injected (``paper_noise_aware`` only) and convert the front to
    int8."""
    import keras

    from coordinator.task_model import to_int8_tflite
    from crowdfl.messages import sha256_hex

    t0 = time.perf_counter()
    keras.utils.set_random_seed(seed)
    x_lab, y_lab = split.lab
    d = setup.feature_dim
    inp, feats = _front_layers(variant, d)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if variant == "none":
        # A device needs *some* bound for the noise: one global bound on |feature| from a
        # noiseless warm-up, mapped to [0, 1] by x / 2B + 1/2. No per-feature normalisation.
        warm = keras.Model(inp, keras.layers.Dense(10)(feats))
        warm.compile(optimizer=keras.optimizers.Adam(0.003), loss=loss)
        warm.fit(x_lab, y_lab, epochs=10, batch_size=32, verbose=0)
        bound = max(float(np.percentile(np.abs(keras.Model(inp, feats).predict(x_lab, verbose=0)), 99)), 1e-3)
        feats = keras.layers.Rescaling(1.0 / (2 * bound), offset=0.5, name="bounded")(feats)
    front = keras.Model(inp, feats)
    clip = setup.clip_l1 if variant.startswith("paper") else float(d)  # no L1 bound: sensitivity d
    transform = _device_transform(clip)
    h = keras.layers.Dense(setup.hidden_units, activation="relu")(transform(feats))
    full = keras.Model(inp, keras.layers.Dense(10)(h))
    full.compile(optimizer=keras.optimizers.Adam(0.003), loss=loss, metrics=["accuracy"])
    full.fit(x_lab, y_lab, epochs=setup.pretrain_epochs, batch_size=32, verbose=0, shuffle=True)
    clean_weights = full.get_weights()
    base_seconds = time.perf_counter() - t0
    out: list[DigitsFront] = []
    for eps in epsilons:
        t1 = time.perf_counter()
        full.set_weights(clean_weights)
        noisy = bool(np.isfinite(eps)) and variant.endswith("noise_aware")
        if noisy:
            transform.noise_scale.assign(laplace_scale(eps, clip, d))
            full.compile(optimizer=keras.optimizers.Adam(0.001), loss=loss, metrics=["accuracy"])
            full.fit(x_lab, y_lab, epochs=setup.finetune_epochs, batch_size=32, verbose=0, shuffle=True)
        lab_acc = float(full.evaluate(x_lab, y_lab, verbose=0)[1])  # inference mode: no noise
        lab_test = float(full.evaluate(split.test[0], split.test[1], verbose=0)[1])
        tflite = to_int8_tflite(front, x_lab[np.random.default_rng(seed).permutation(len(x_lab))])
        spec = replace(_spec(variant, eps, setup, clip), front_model_hash=sha256_hex(tflite))
        initial = tuple(initial_back_weights(spec, seed))
        out.append(DigitsFront(variant, float(eps), spec, tflite, initial, lab_acc, lab_test, base_seconds / len(epsilons) + time.perf_counter() - t1))
    return out


def device_features(f: DigitsFront, images: np.ndarray) -> np.ndarray:
    from crowdfl.front import FrontModel

    return FrontModel(f.front_tflite, f.spec.front_model_hash)(images)


def clean_features(f: DigitsFront, images: np.ndarray) -> np.ndarray:
    from crowdfl.task import prepare_features

    return prepare_features(device_features(f, images), f.spec.feature_scale, f.spec.clip_l1)


def customer_pool(f: DigitsFront, split: Split, setup: DigitsSetup, seed: int, repeats: int = 1) -> Pool:
    """Customers hold disjoint random shares of the customer split; each noises its images once.

    ``repeats`` > 1 is a data-volume ablation, NOT a valid privacy setting: every image is
    released `repeats` times with fresh noise (spending repeats x epsilon on it), which is what
    `repeats` times as many distinct images with the same features would give. It shows what the
    same pipeline does with MNIST-sized data.
    """
    from agent.privacy import privatise_features

    x, y = split.customers
    order = np.random.default_rng([seed, 1]).permutation(len(y))
    shares = np.array_split(order, setup.customers)
    ids, feats, labels = [], [], []
    for i, idx in enumerate(shares):
        raw = device_features(f, x[idx])
        parts = [privatise_features(raw, f.spec, np.random.default_rng([seed, i, 5, r])) for r in range(repeats)]
        mix = np.random.default_rng([seed, i, 6]).permutation(len(idx) * repeats)
        feats.append(np.concatenate(parts)[mix])
        labels.append(np.tile(y[idx], repeats)[mix])
        ids.append(f"digits-{i:03d}")
    return Pool(tuple(ids), tuple(feats), tuple(labels))


def noisy_test(f: DigitsFront, images: np.ndarray, seed: int) -> np.ndarray:
    from agent.privacy import privatise_features

    return privatise_features(device_features(f, images), f.spec, np.random.default_rng([seed, 77]))


def central_baseline(setup: DigitsSetup, split: Split, seed: int) -> tuple[float, float]:
    """Non-private, centralised: the same network end to end on lab + customer images (float).

    Returns (validation accuracy, test accuracy).
    """
    import keras

    keras.utils.set_random_seed(seed)
    inp, feats = _front_layers("paper", setup.feature_dim)
    h = keras.layers.Dense(setup.hidden_units, activation="relu")(feats)
    out = keras.layers.Dense(10)(h)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(0.003), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.concatenate([split.lab[0], split.customers[0]])
    y = np.concatenate([split.lab[1], split.customers[1]])
    model.fit(x, y, epochs=setup.pretrain_epochs, batch_size=32, verbose=0, shuffle=True)

    def acc(part: tuple[np.ndarray, np.ndarray]) -> float:
        return float((model.predict(part[0], verbose=0).argmax(axis=1) == part[1]).mean())

    return acc(split.validation), acc(split.test)


def nearest_mean_accuracy(pool: Pool, evaluation: tuple[np.ndarray, np.ndarray], classes: int = 10) -> float:
    """A reference estimator on the very same released data: per-class means of the pooled noisy
    features, clean features assigned to the nearest. Laplace noise is zero-mean, so the means
    are unbiased; it shows how much the released data allow, apart from how the head is trained."""
    x = np.concatenate(pool.features)
    y = np.concatenate(pool.labels)
    means = np.stack([x[y == k].mean(axis=0) if (y == k).any() else np.full(x.shape[1], np.inf) for k in range(classes)])
    pred = ((evaluation[0][:, None, :] - means[None]) ** 2).sum(axis=-1).argmin(axis=1)
    return float((pred == evaluation[1]).mean())
