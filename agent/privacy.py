"""Local differential privacy for released features (pure: no I/O).

Each feature vector is first normalised by ``crowdfl.task.prepare_features``: divided by the
task's per-feature scale, box-clipped to [0, 1] and L1-clipped to ``clip_l1``. Two such vectors x
and x' of any two samples differ in L1 norm by at most

    sensitivity = min(2 * clip_l1, feature_dim)

(2·C for two points of an L1 ball of radius C; d for two points of the unit box), so adding
independent Laplace(0, sensitivity / epsilon) noise to every coordinate makes the released vector
epsilon-differentially private with respect to the sample (Dwork et al. 2006). Each sample is
released at most once, so a sample's spent budget is the epsilon of its single release; the
ledger that enforces this lives in ``agent.state``.

Labels can be protected separately with k-ary randomised response (``label_epsilon > 0``); with
``label_epsilon == 0`` they are released as is and the guarantee covers the features only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crowdfl.errors import PrivacyError
from crowdfl.messages import TaskSpec
from crowdfl.task import laplace_scale, prepare_features, sensitivity  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class PrivacyPolicy:
    """The device owner's limits, from the agent's config."""

    max_epsilon: float = 8.0  # largest per-sample epsilon (features + labels) the owner accepts
    require_label_privacy: bool = False

    def __post_init__(self) -> None:
        if not (np.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ValueError(f"max_epsilon must be a positive finite number, got {self.max_epsilon}")

    def check(self, spec: TaskSpec) -> None:
        if not np.isfinite(spec.epsilon) or spec.epsilon <= 0:
            raise PrivacyError("bad_epsilon", f"task {spec.task_id[:12]} asks for epsilon {spec.epsilon}")
        if spec.epsilon > self.max_epsilon:
            raise PrivacyError(
                "epsilon_too_large",
                f"task {spec.task_id[:12]} asks for epsilon {spec.epsilon:g} per sample; this device allows "
                f"at most {self.max_epsilon:g} (privacy.max_epsilon in the agent config)",
            )
        if spec.clip_l1 <= 0 or not np.isfinite(spec.clip_l1):
            raise PrivacyError("bad_clip", f"clip_l1 must be positive, got {spec.clip_l1}")
        if not np.isfinite(spec.label_epsilon) or spec.label_epsilon < 0:
            raise PrivacyError("bad_epsilon", f"task {spec.task_id[:12]} asks for label epsilon {spec.label_epsilon}")
        if self.require_label_privacy and spec.label_epsilon == 0:
            raise PrivacyError("labels_in_clear", "this device requires label privacy and the task sends labels as is")
        if spec.epsilon + spec.label_epsilon > self.max_epsilon:
            raise PrivacyError(
                "epsilon_too_large",
                f"features ({spec.epsilon:g}) and labels ({spec.label_epsilon:g}) together exceed this device's "
                f"{self.max_epsilon:g} per sample",
            )


def privatise_features(features: np.ndarray, spec: TaskSpec, rng: np.random.Generator) -> np.ndarray:
    """Normalise, clip and add Laplace noise: what leaves the device."""
    x = prepare_features(features, spec.feature_scale, spec.clip_l1)
    b = laplace_scale(spec.epsilon, spec.clip_l1, x.shape[1])
    return (x + rng.laplace(0.0, b, size=x.shape)).astype(np.float32)


def randomised_response(labels: np.ndarray, num_classes: int, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """k-ary randomised response: keep the label with probability e^eps / (e^eps + k - 1)."""
    if epsilon <= 0:
        return labels.copy()
    keep = np.exp(epsilon) / (np.exp(epsilon) + num_classes - 1)
    other = rng.integers(0, num_classes - 1, size=labels.shape)
    other = other + (other >= labels)  # uniform over the k - 1 other classes
    flip = rng.random(labels.shape) >= keep
    return np.where(flip, other, labels).astype(labels.dtype)
