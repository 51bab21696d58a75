"""An honest-but-curious edge server attacks what it legitimately receives: the noisy features.

The edge knows everything public about the task (the int8 front, the normalisation, epsilon),
so it can simulate its own "shadow" households, push them through the very same device code
(`crowdfl.front.FrontModel`, `agent.privacy.privatise_features`) and learn a mapping from released
features to what it wants to know. It is then scored on other ("victim") households:

* per sample: the window's total energy (log Wh, R^2) from one released feature vector, from the
  label alone (labels are sent in clear unless the task sets label_epsilon), and from both;
* per household: whether the home has an EV charger / a dishwasher (ROC AUC), from the mean of
  all the features that home released during the task. Per-sample epsilon says nothing about
  this: a home releasing k samples is protected at k * epsilon for a property shared by all of
  them (group privacy), and averaging k noisy vectors removes the noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crowdfl.messages import TaskSpec

from .household_task import Design, Homes, front_features, release_order


@dataclass(frozen=True)
class AttackResult:
    epsilon: float
    r2_features: float
    r2_label: float
    r2_both: float
    auc_ev: float  # from the mean released features and the label histogram
    auc_dishwasher: float
    auc_ev_features: float  # from the mean released features alone
    auc_dishwasher_features: float
    auc_ev_labels: float  # from the label histogram alone (in clear unless the task sets label_epsilon)
    auc_dishwasher_labels: float
    victims: int
    ev_homes: int


def _released(d: Design, h: Homes, seed: int, per_home: int, spec: TaskSpec) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(noisy features, labels, window totals) of what each home releases during the task."""
    from agent.privacy import privatise_features, randomised_response

    out = []
    for i, s in enumerate(h.samples):
        order = release_order(len(s), seed, i)[:per_home]
        raw = front_features(d, s.inputs[order])
        if np.isfinite(spec.epsilon):
            feats = privatise_features(raw, spec, np.random.default_rng([seed, i, 9]))
        else:
            from crowdfl.task import prepare_features

            feats = prepare_features(raw, spec.feature_scale, spec.clip_l1)
        labels = randomised_response(s.labels[order].astype(np.int64), spec.num_classes, spec.label_epsilon, np.random.default_rng([seed, i, 10]))
        out.append((feats, labels, h.window_wh[i][order]))
    return out


def _home_vectors(rel: list[tuple[np.ndarray, np.ndarray, np.ndarray]], classes: int) -> np.ndarray:
    rows = []
    for feats, labels, _ in rel:
        hist = np.bincount(labels, minlength=classes) / max(len(labels), 1)
        rows.append(np.concatenate([feats.mean(axis=0), hist]))
    return np.array(rows)


def attribute_inference(d: Design, shadow: Homes, victims: Homes, per_home: int, seed: int, max_train: int = 20000) -> AttackResult:
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import r2_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    spec = d.spec
    classes = spec.num_classes
    s_rel = _released(d, shadow, seed + 1, per_home, spec)
    v_rel = _released(d, victims, seed + 2, per_home, spec)

    def stack(rel):  # type: ignore[no-untyped-def]
        f = np.concatenate([r[0] for r in rel])
        lab = np.eye(classes)[np.concatenate([r[1] for r in rel])]
        y = np.log1p(np.concatenate([r[2] for r in rel]))
        return f, lab, y

    sf, sl, sy = stack(s_rel)
    vf, vl, vy = stack(v_rel)
    pick = np.random.default_rng(seed).permutation(len(sy))[:max_train]
    r2 = {}
    for name, (xs, xv) in {
        "features": (sf, vf),
        "label": (sl, vl),
        "both": (np.hstack([sf, sl]), np.hstack([vf, vl])),
    }.items():
        model = HistGradientBoostingRegressor(max_iter=100, random_state=seed).fit(xs[pick], sy[pick])
        r2[name] = float(r2_score(vy, model.predict(xv)))
    hs, hv = _home_vectors(s_rel, classes), _home_vectors(v_rel, classes)
    d = spec.feature_dim
    columns = {"both": slice(None), "features": slice(0, d), "labels": slice(d, None)}
    auc: dict[tuple[str, str], float] = {}
    for kind in ("ev_charger", "dishwasher"):
        ys = np.array([p.has(kind) for p in shadow.profiles])
        yv = np.array([p.has(kind) for p in victims.profiles])
        for name, cols in columns.items():
            if ys.all() or not ys.any() or yv.all() or not yv.any():
                auc[(kind, name)] = float("nan")
                continue
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(hs[:, cols], ys)
            auc[(kind, name)] = float(roc_auc_score(yv, clf.predict_proba(hv[:, cols])[:, 1]))
    ev = int(sum(p.has("ev_charger") for p in victims.profiles))
    return AttackResult(
        spec.epsilon, r2["features"], r2["label"], r2["both"],
        auc[("ev_charger", "both")], auc[("dishwasher", "both")],
        auc[("ev_charger", "features")], auc[("dishwasher", "features")],
        auc[("ev_charger", "labels")], auc[("dishwasher", "labels")],
        len(victims.profiles), ev,
    )
