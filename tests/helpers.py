"""Small builders shared by tests (no fixtures with side effects here)."""

from __future__ import annotations

import numpy as np

from crowdfl.devices import DEVICE_KINDS
from crowdfl.messages import TaskSpec


def make_spec(**overrides: object) -> TaskSpec:
    base: dict[str, object] = dict(
        task_id="ab" * 32,
        title="test task",
        rounds=3,
        epsilon=4.0,
        label_epsilon=0.0,
        clip_l1=1.0,
        window_hours=24,
        horizon_hours=6,
        device_kinds=tuple(DEVICE_KINDS),
        class_edges_wh=np.array([900.0, 2300.0, 5000.0]),
        input_scale=np.full(len(DEVICE_KINDS), 8.0, np.float32),
        feature_scale=np.ones(8, np.float32),
        front_model_hash="00" * 32,
        initial_model_hash="11" * 32,
        feature_dim=8,
        hidden_units=16,
        samples_per_round=64,
        local_epochs=2,
        learning_rate=0.01,
        aggregation="fedavg",
        deadline=2_000_000_000,
    )
    base.update(overrides)
    return TaskSpec(**base)  # type: ignore[arg-type]
