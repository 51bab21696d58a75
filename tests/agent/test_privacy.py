"""agent.privacy: the clipping bound, the Laplace scale and the owner's policy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from agent.privacy import PrivacyPolicy, laplace_scale, privatise_features, randomised_response, sensitivity
from crowdfl.errors import PrivacyError
from crowdfl.task import prepare_features
from tests.helpers import make_spec


def test_sensitivity_is_the_smaller_of_two_bounds() -> None:
    assert sensitivity(1.0, 8) == 2.0
    assert sensitivity(6.0, 8) == 8.0
    assert laplace_scale(4.0, 1.0, 8) == pytest.approx(0.5)


@settings(max_examples=200, deadline=None)
@given(
    arrays(np.float32, (2, 8), elements=st.floats(-5, 50, width=32)),
    st.floats(0.1, 10.0),
)
def test_prepared_vectors_differ_by_at_most_the_sensitivity(x: np.ndarray, clip: float) -> None:
    p = prepare_features(x, np.ones(8, np.float32), clip)
    assert (p >= 0).all() and (p <= 1).all()
    assert np.abs(p).sum(axis=1).max() <= clip * (1 + 1e-5)
    assert np.abs(p[0] - p[1]).sum() <= sensitivity(clip, 8) * (1 + 1e-5)


def test_noise_has_the_laplace_scale_sensitivity_over_epsilon() -> None:
    spec = make_spec(epsilon=2.0, clip_l1=1.0)
    rng = np.random.default_rng(1)
    x = np.full((40_000, 8), 0.05, np.float32)
    noisy = privatise_features(x, spec, rng)
    clean = prepare_features(x, spec.feature_scale, spec.clip_l1)
    dev = noisy - clean
    b = laplace_scale(2.0, 1.0, 8)
    # for Laplace(0, b): mean |X| = b and var = 2 b^2
    assert np.abs(dev).mean() == pytest.approx(b, rel=0.02)
    assert dev.var() == pytest.approx(2 * b * b, rel=0.04)
    assert abs(float(np.median(dev))) < 0.02


def test_policy_refuses_large_or_invalid_epsilon() -> None:
    policy = PrivacyPolicy(max_epsilon=3.0)
    policy.check(make_spec(epsilon=3.0))
    with pytest.raises(PrivacyError, match="at most 3"):
        policy.check(make_spec(epsilon=4.0))
    with pytest.raises(PrivacyError, match="bad_epsilon"):
        policy.check(make_spec(epsilon=0.0))
    with pytest.raises(PrivacyError, match="labels_in_clear"):
        PrivacyPolicy(require_label_privacy=True).check(make_spec(label_epsilon=0.0))


def test_randomised_response_keeps_with_the_right_probability() -> None:
    rng = np.random.default_rng(0)
    labels = np.zeros(50_000, np.int8)
    out = randomised_response(labels, 4, 1.0, rng)
    keep = np.e / (np.e + 3)
    assert (out == 0).mean() == pytest.approx(keep, abs=0.01)
    assert set(np.unique(out)) == {0, 1, 2, 3}
    assert (randomised_response(labels, 4, 0.0, rng) == labels).all()


def test_label_epsilon_must_be_finite_and_counts_towards_the_cap() -> None:
    with pytest.raises(PrivacyError, match="bad_epsilon"):
        PrivacyPolicy(8.0, require_label_privacy=True).check(make_spec(label_epsilon=float("nan")))
    with pytest.raises(PrivacyError, match="together exceed"):
        PrivacyPolicy(5.0).check(make_spec(epsilon=4.0, label_epsilon=2.0))
    PrivacyPolicy(6.0).check(make_spec(epsilon=4.0, label_epsilon=2.0))
    with pytest.raises(ValueError):
        PrivacyPolicy(float("inf"))
