"""Small builders shared by tests (no fixtures with side effects here)."""

from __future__ import annotations

import numpy as np

from crowdfl.devices import DEVICE_KINDS
from crowdfl.identity import Identity
from crowdfl.messages import FeatureBatch, TaskSpec


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


def with_receipt(
    batch: FeatureBatch, device: Identity, edge_id: str, history: dict[tuple[str, str], list[tuple[bytes, int]]] | None = None
) -> FeatureBatch:
    """The batch with the device's signed receipt, as the agent makes it (crowdfl/receipts.py).

    ``history`` holds (digest, samples) of the device's earlier batches per (device, task); it is
    updated, so consecutive calls build the receipts of consecutive rounds."""
    import dataclasses

    from crowdfl.receipts import ContributionReceipt, batch_digest, batches_root, sign_receipt

    prior = (history if history is not None else {}).setdefault((device.node_id, batch.task_id), [])
    digest = batch_digest(batch)
    receipt = sign_receipt(
        ContributionReceipt(
            batch.task_id, batch.round, device.node_id, edge_id, sum(n for _, n in prior) + len(batch.sample_ids),
            len(prior) + 1, batches_root([d for d, _ in prior] + [digest]), float(batch.epsilon),
        ),
        device,
    )
    prior.append((digest, len(batch.sample_ids)))
    return dataclasses.replace(batch, receipt=receipt.raw)


def update_receipt(
    device: Identity, task_id: str, round_: int, edge_id: str, num_samples: int, root: str = "ab" * 32,
    num_batches: int = 1, epsilon: float = 4.0,
) -> bytes:
    """A device-signed receipt for an update built by hand in a test."""
    from crowdfl.receipts import ContributionReceipt, sign_receipt

    return sign_receipt(
        ContributionReceipt(task_id, round_, device.node_id, edge_id, num_samples, num_batches, root, epsilon), device
    ).raw
