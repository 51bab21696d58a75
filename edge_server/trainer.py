"""Per-customer training of the dense layers on that customer's noisy features (TensorFlow).

Training starts from the round's global model. The noise was added once, on the device; local
epochs reuse the same noisy features, which costs no privacy (post-processing).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crowdfl.backmodel import check_back_weights, keras_back
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


def train_customer(global_weights: Sequence[np.ndarray], data: CustomerData, spec: TaskSpec, seed: int) -> TrainResult:
    import keras

    check_back_weights(global_weights, spec)
    if len(data.labels) == 0:
        raise ValueError("no samples to train on")
    t0 = time.perf_counter()
    keras.utils.set_random_seed(seed)
    model = keras_back(spec)
    model.set_weights([np.asarray(w) for w in global_weights])
    model.compile(
        optimizer=keras.optimizers.Adam(spec.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    hist = model.fit(data.features, data.labels, epochs=spec.local_epochs, batch_size=32, shuffle=True, verbose=0)
    weights = [np.asarray(w, dtype=np.float32) for w in model.get_weights()]
    loss = float(hist.history["loss"][-1])
    return TrainResult(weights, loss, time.perf_counter() - t0, len(data.labels), inputs_digest(data))
