"""The edge's class-statistics trainer: TF and numpy agree, aggregation yields the pooled rule."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from bench.quality.fasttrain import train_numpy
from coordinator.aggregation import aggregate
from crowdfl.backmodel import back_logits, initial_back_weights
from crowdfl.messages import TaskSpec
from edge_server.store import CustomerData
from edge_server.trainer import HeadTrainer, class_means_of, statistics_head_fits

pytest.importorskip("tensorflow")


def _spec(hidden: int = 48, epsilon: float = 2.0) -> TaskSpec:
    return TaskSpec(
        task_id="ab" * 32, title="t", rounds=3, epsilon=epsilon, label_epsilon=0.0, clip_l1=1.0,
        window_hours=4, horizon_hours=1, device_kinds=("k",), class_edges_wh=np.arange(3, dtype=np.float64),
        input_scale=np.ones(1, np.float32), feature_scale=np.ones(8, np.float32), front_model_hash="",
        initial_model_hash="", feature_dim=8, hidden_units=hidden, samples_per_round=10, local_epochs=2,
        learning_rate=0.01, aggregation="fedavg", deadline=0,
    )


def _customer(rng: np.random.Generator, n: int, spec: TaskSpec, means: np.ndarray) -> CustomerData:
    y = rng.integers(0, spec.num_classes, n)
    x = means[y] + rng.laplace(0.0, 1.0, (n, spec.feature_dim))
    return CustomerData(np.arange(n, dtype=np.uint64), x.astype(np.float32), y)


@pytest.fixture(scope="module")
def spec() -> TaskSpec:
    return _spec()


@pytest.fixture(scope="module")
def trainer(spec: TaskSpec) -> HeadTrainer:
    return HeadTrainer(spec)


@pytest.fixture(scope="module")
def statistics_only(spec: TaskSpec) -> HeadTrainer:
    return HeadTrainer(spec, finetune_steps=0)


def test_tensorflow_and_numpy_trainers_agree(spec: TaskSpec, trainer: HeadTrainer) -> None:
    rng = np.random.default_rng(1)
    means = rng.uniform(0, 0.3, (spec.num_classes, spec.feature_dim))
    g = initial_back_weights(spec, 0)
    for n in (5, 37, 200):
        data = _customer(rng, n, spec, means)
        tf_w = trainer.train(g, data, 0).weights
        np_w = train_numpy(g, data, spec, 0)
        for a, b in zip(tf_w, np_w, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)  # float32 Adam, two libraries
        x = rng.uniform(0, 0.3, (200, spec.feature_dim)).astype(np.float32)
        assert (back_logits(tf_w, x).argmax(1) == back_logits(np_w, x).argmax(1)).mean() > 0.98
    # one trace serves every customer, whatever its number of samples
    assert trainer._fit.experimental_get_tracing_count() == 1


def test_aggregate_of_heads_is_the_pooled_nearest_class_mean_rule(spec: TaskSpec, trainer: HeadTrainer, statistics_only: HeadTrainer) -> None:
    rng = np.random.default_rng(2)
    means = rng.uniform(0, 0.3, (spec.num_classes, spec.feature_dim))
    g = initial_back_weights(spec, 0)
    customers = [_customer(rng, n, spec, means) for n in (40, 60, 80)]
    updates = [statistics_only.train(g, c, 0).weights for c in customers]
    agg = aggregate("fedavg", updates, [len(c.labels) for c in customers]).weights
    # the aggregate carries the count-weighted average of the customers' class means ...
    per = []
    for c in customers:
        per.append(np.stack([c.features[c.labels == k].mean(axis=0) for k in range(spec.num_classes)]))
    w = np.array([len(c.labels) for c in customers], np.float64)
    avg = np.tensordot(w / w.sum(), np.array(per, np.float64), axes=1)
    np.testing.assert_allclose(class_means_of(agg, spec), avg, atol=1e-5)
    # ... and computes x . mu_k - |mu_k|^2 / 2 (up to one constant for all classes) on clean features
    x = rng.uniform(0, 1, (50, spec.feature_dim)).astype(np.float32)
    x /= np.maximum(1.0, x.sum(axis=1, keepdims=True))
    logits = back_logits(agg, x)
    ncm = x @ avg.T - 0.5 * (avg**2).sum(axis=1)
    diff = logits - ncm
    np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :1], diff.shape), atol=1e-3)
    # and a wrong aggregate (someone else's means) would not
    assert not np.allclose(class_means_of(agg, spec), per[0], atol=1e-3)
    # fine-tuning leaves the product units alone: the aggregate still carries the averaged means
    tuned = aggregate("fedavg", [trainer.train(g, c, 0).weights for c in customers], [len(c.labels) for c in customers]).weights
    np.testing.assert_allclose(class_means_of(tuned, spec), avg, atol=1e-4)


def test_class_with_no_sample_keeps_the_global_estimate(spec: TaskSpec, trainer: HeadTrainer) -> None:
    rng = np.random.default_rng(3)
    means = rng.uniform(0, 0.3, (spec.num_classes, spec.feature_dim))
    first = trainer.train(initial_back_weights(spec, 0), _customer(rng, 400, spec, means), 0).weights
    data = _customer(rng, 50, spec, means)
    keep = data.labels != 2
    only = CustomerData(data.sample_ids[keep], data.features[keep], data.labels[keep])
    out = trainer.train(first, only, 0).weights
    np.testing.assert_allclose(class_means_of(out, spec)[2], class_means_of(first, spec)[2], atol=1e-6)


def test_bad_labels_and_empty_data_are_refused(spec: TaskSpec, trainer: HeadTrainer) -> None:
    g = initial_back_weights(spec, 0)
    with pytest.raises(ValueError, match="labels outside"):
        trainer.train(g, CustomerData(np.arange(2, dtype=np.uint64), np.zeros((2, 8), np.float32), np.array([0, 9])), 0)
    with pytest.raises(ValueError, match="no samples"):
        trainer.train(g, CustomerData(np.zeros(0, np.uint64), np.zeros((0, 8), np.float32), np.zeros(0, np.int64)), 0)


def test_small_head_falls_back_to_adam_on_a_reused_model() -> None:
    spec = replace(_spec(hidden=16))
    assert not statistics_head_fits(spec)
    tr = HeadTrainer(spec)
    rng = np.random.default_rng(4)
    means = rng.uniform(0, 0.3, (spec.num_classes, spec.feature_dim))
    g = initial_back_weights(spec, 0)
    a = tr.train(g, _customer(rng, 64, spec, means), 5)
    b = tr.train(g, _customer(rng, 64, spec, means), 5)
    assert [w.shape for w in a.weights] == [w.shape for w in g]
    assert any(not np.allclose(x, y) for x, y in zip(a.weights, g, strict=True))
    assert np.isfinite(a.loss) and np.isfinite(b.loss)


def test_small_head_is_the_shared_numpy_adam() -> None:
    """The edge's fallback is exactly crowdfl.headtrain.adam_head (no Keras fit per customer, whose
    set-up cost 0.54 s a customer): the coordinator's FLTrust reference runs the same function."""
    from coordinator.reference import reference_model, RootData
    from crowdfl.headtrain import adam_head, head_loss

    spec = _spec(hidden=16)
    rng = np.random.default_rng(9)
    data = _customer(rng, 70, spec, rng.uniform(0, 0.3, (spec.num_classes, spec.feature_dim)))
    g = initial_back_weights(spec, 1)
    got = HeadTrainer(spec).train(g, data, 11)
    want = adam_head(g, data.features, np.asarray(data.labels, np.int64), spec, 11)
    assert all(np.array_equal(a, b) for a, b in zip(got.weights, want, strict=True))
    assert got.loss == head_loss(want, data.features, data.labels) < head_loss(g, data.features, data.labels)
    ref = reference_model(g, RootData(data.features, np.asarray(data.labels, np.int64)), spec, 11)
    assert all(np.array_equal(a, b) for a, b in zip(ref, want, strict=True))


def test_randomised_labels_are_unmixed_with_the_known_channel(spec: TaskSpec) -> None:
    """With label_epsilon > 0 the class means are estimated through the channel's inverse: the
    mean of the noisy-label groups would be pulled towards the grand mean, the un-mixed one is not."""
    from agent.privacy import randomised_response

    rr = replace(spec, label_epsilon=1.0)
    stats = HeadTrainer(rr, finetune_steps=0)
    rng = np.random.default_rng(5)
    means = np.zeros((rr.num_classes, rr.feature_dim))
    means[np.arange(rr.num_classes), np.arange(rr.num_classes)] = 0.8
    y = rng.integers(0, rr.num_classes, 20_000)
    x = (means[y] + rng.normal(0, 0.05, (len(y), rr.feature_dim))).astype(np.float32)
    noisy = randomised_response(y, rr.num_classes, 1.0, rng)
    data = CustomerData(np.arange(len(y), dtype=np.uint64), x, noisy)
    est = class_means_of(stats.train(initial_back_weights(rr, 0), data, 0).weights, rr)
    np.testing.assert_allclose(est, means, atol=0.06)  # a ratio of noisy estimates; 20,000 samples
    naive = np.stack([x[noisy == k].mean(axis=0) for k in range(rr.num_classes)])
    assert np.abs(naive - means).max() > 0.2  # what ignoring the channel would give
    # the numpy mirror does the same, fine-tuning with the forward-corrected loss included
    small = CustomerData(data.sample_ids[:300], x[:300], noisy[:300])
    tf_w = HeadTrainer(rr).train(initial_back_weights(rr, 0), small, 0).weights
    np_w = train_numpy(initial_back_weights(rr, 0), small, rr, 0)
    for a, b in zip(tf_w, np_w, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_the_coordinators_reference_is_trained_by_the_edges_rule(spec: TaskSpec, trainer: HeadTrainer) -> None:
    """FLTrust scores an update by its cosine to the coordinator's reference update: the reference
    must come from the procedure an honest edge runs, or honest customers are scored by the gap
    between two trainers. With room for the statistics head, the reference is that head (its
    update from the global model points the same way as an honest edge's on data from the same
    homes); without room, both sides run the shared numpy Adam."""
    from coordinator.reference import RootData, reference_model
    from crowdfl.headtrain import adam_head

    rng = np.random.default_rng(5)
    means = rng.uniform(0, 0.3, (spec.num_classes, spec.feature_dim))
    g = initial_back_weights(spec, 0)
    root = _customer(rng, 400, spec, means)
    ref = reference_model(g, RootData(root.features, root.labels), spec, 0)
    honest = trainer.train(g, _customer(rng, 400, spec, means), 0).weights
    flat = lambda w: np.concatenate([(a - b).ravel() for a, b in zip(w, g, strict=True)])  # noqa: E731
    cos = float(flat(ref) @ flat(honest) / np.linalg.norm(flat(ref)) / np.linalg.norm(flat(honest)))
    assert cos > 0.9, cos
    adam_ref = adam_head(g, root.features, root.labels, spec, 0)  # what the reference used to be
    cos_adam = float(flat(adam_ref) @ flat(honest) / np.linalg.norm(flat(adam_ref)) / np.linalg.norm(flat(honest)))
    assert cos_adam < cos - 0.2, (cos_adam, cos)

    small = _spec(hidden=16)
    assert not statistics_head_fits(small)
    g16 = initial_back_weights(small, 0)
    np.testing.assert_array_equal(
        np.concatenate([w.ravel() for w in reference_model(g16, RootData(root.features, root.labels), small, 3)]),
        np.concatenate([w.ravel() for w in adam_head(g16, root.features, root.labels, small, 3)]),
    )
