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


# --------------------------------------------------------------------------- discrete Laplace

def _dlap_pmf(z: np.ndarray, scale: float) -> np.ndarray:
    p = np.exp(-1.0 / scale)
    return (1 - p) / (1 + p) * p ** np.abs(z)


def _assert_discrete_laplace(z: np.ndarray, scale: float) -> None:
    """Mean |z| and mean against the discrete Laplace at ``scale``, then a chi-square against its pmf
    that passes at ``scale`` and fails 10% off it."""
    n = len(z)
    p = np.exp(-1.0 / scale)
    assert np.abs(z).mean() == pytest.approx(2 * p / (1 - p * p), rel=0.03)
    assert abs(z.mean()) < 4 * np.sqrt(2 * p / (1 - p) ** 2 / n)

    def chi2(s: float) -> tuple[float, int]:
        edges = np.unique(np.round(np.quantile(np.abs(z), np.linspace(0, 1, 12)[1:-1]))).astype(int)
        bins = np.concatenate([[-np.inf], -edges[::-1] - 0.5, edges + 0.5, [np.inf]])
        obs = np.histogram(z, bins)[0]
        grid = np.arange(-int(60 * s) - 10, int(60 * s) + 11)
        exp = np.histogram(grid, bins, weights=_dlap_pmf(grid, s))[0] * n
        return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1

    stat, dof = chi2(scale)
    assert stat < dof + 5 * np.sqrt(2 * dof)
    wrong, _ = chi2(scale * 1.1)
    assert wrong > dof + 5 * np.sqrt(2 * dof)


@pytest.mark.parametrize("scale", [0.7, 3.0, 41.0])
def test_exact_sampler_matches_the_discrete_laplace_pmf(scale: float) -> None:
    """Chi-square against the pmf with a fixed seed; 10% off in the scale fails it."""
    from fractions import Fraction
    from random import Random

    from agent.privacy import discrete_laplace

    n = 30_000
    rng = Random(7)
    z = np.array([discrete_laplace(Fraction(scale), rng) for _ in range(n)])
    _assert_discrete_laplace(z, scale)


@pytest.mark.parametrize("scale", [0.7, 3.0, 41.0, 2050.0])
def test_batched_exact_sampler_matches_the_discrete_laplace_pmf(scale: float) -> None:
    """The numpy-batched sampler a device uses (same algorithm on uint64 words): the same chi-square
    against the pmf, from seeded words; 10% off in the scale fails it."""
    from fractions import Fraction

    from agent.privacy import discrete_laplace_batch

    gen = np.random.default_rng(11)

    def words(k: int) -> np.ndarray:
        return gen.integers(0, np.iinfo(np.uint64).max, size=k, dtype=np.uint64, endpoint=True)

    n = 30_000
    z = discrete_laplace_batch(Fraction(scale), n, words)
    assert z.shape == (n,) and z.dtype == np.int64
    _assert_discrete_laplace(z, scale)


def test_batched_sampler_edge_cases() -> None:
    """Uniform draws below m = 1 (the Geometric part's first step) and scales whose fraction is too
    long for uint64 (the scalar fallback) still give the right distribution; the OS source too."""
    from fractions import Fraction

    from agent.privacy import _uniform_below, discrete_laplace_batch

    gen = np.random.default_rng(5)

    def words(k: int) -> np.ndarray:
        return gen.integers(0, np.iinfo(np.uint64).max, size=k, dtype=np.uint64, endpoint=True)

    assert not _uniform_below(np.ones(1000, np.uint64), words).any()
    r = _uniform_below(np.full(60_000, 3, np.uint64), words)
    assert set(np.unique(r).tolist()) == {0, 1, 2} and np.bincount(r.astype(np.int64)).min() > 19_000
    long = Fraction(0.1) * 30  # numerator and denominator beyond 2^40: the scalar sampler
    z = discrete_laplace_batch(long, 4_000, words)
    p = np.exp(-1.0 / float(long))
    assert np.abs(z).mean() == pytest.approx(2 * p / (1 - p * p), rel=0.08)
    z = discrete_laplace_batch(Fraction(25), 20_000)  # os.urandom
    p = np.exp(-1.0 / 25)
    assert np.abs(z).mean() == pytest.approx(2 * p / (1 - p * p), rel=0.05)


def test_os_random_sampler_has_the_right_scale() -> None:
    """From the OS CSPRNG (not reproducible): mean |z| within 5% (≈ 7 standard errors)."""
    from fractions import Fraction

    from agent.privacy import OsRandom, discrete_laplace

    scale = 25.0
    rng = OsRandom()
    z = np.array([discrete_laplace(Fraction(scale), rng) for _ in range(20_000)])
    p = np.exp(-1.0 / scale)
    assert np.abs(z).mean() == pytest.approx(2 * p / (1 - p * p), rel=0.05)
    with pytest.raises(NotImplementedError):
        rng.getstate()


def test_simulated_sampler_has_the_same_distribution() -> None:
    from agent.privacy import simulated_discrete_laplace

    scale = 3.0
    z = simulated_discrete_laplace(scale, 200_000, np.random.default_rng(3))
    for k in range(-4, 5):
        assert (z == k).mean() == pytest.approx(_dlap_pmf(np.array(k), scale), rel=0.05)


def test_released_features_lie_on_the_grid_with_the_promised_scale() -> None:
    from random import Random

    from agent.privacy import GRID, grid_sensitivity, noise_scale

    spec = make_spec(epsilon=4.0, clip_l1=1.0)
    x = np.random.default_rng(2).uniform(0, 0.2, (600, 8)).astype(np.float32)
    noisy = privatise_features(x, spec, Random(5))
    steps = noisy.astype(np.float64) / GRID
    assert np.array_equal(steps, np.round(steps))  # a function of integers only: no float leak
    assert grid_sensitivity(1.0, 8) == 8192 + 8
    b = noise_scale(4.0, 1.0, 8)
    assert b == pytest.approx(laplace_scale(4.0, 1.0, 8), rel=0.002)
    dev = noisy - prepare_features(x, spec.feature_scale, spec.clip_l1)
    assert np.abs(dev).mean() == pytest.approx(b, rel=0.06)
