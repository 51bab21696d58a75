"""The quality benchmark's --quick mode end to end, with invariants its figures must satisfy.

Runs `python -m bench.quality --quick` (about a minute: TensorFlow, LiteRT and scikit-learn)
in a subprocess, then reads its results.json. Needs the `bench` extra (scikit-learn, matplotlib).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.realparts import require_module

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

NOISE = 0.05  # accuracy differences below this are run-to-run noise at these sample sizes


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:  # type: ignore[type-arg]
    require_module("sklearn", "needs the bench extra: pip install -e .[bench]")
    require_module("matplotlib", "needs the bench extra: pip install -e .[bench]")
    out = tmp_path_factory.mktemp("quality")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.quality", "--quick", "--out", str(out), "--no-docs"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,  # minutes on a loaded 2-core machine
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), out


def test_outputs_written(quick: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    res, out = quick
    report = (out / "report.md").read_text()
    for png in ("digits_accuracy_vs_epsilon.png", "household_accuracy_vs_epsilon.png", "attacks_per_round.png", "inference_attack_vs_epsilon.png"):
        assert (out / png).stat().st_size > 1000
        assert png in report
    assert res["environment"]["scikit-learn"] and res["seconds"]["total"] > 0
    assert f"--seed {res['plan']['seed']}" in report


def test_numpy_trainer_matches_the_edge_trainer(quick: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    tc = quick[0]["trainer_check"]
    assert tc["max_abs_accuracy_gap"] < NOISE
    assert tc["seconds_per_training"]["numpy"] < tc["seconds_per_training"]["keras_legacy"]
    # the edge's trainer, built once per task, against the one it replaced (a fresh model per call)
    assert tc["seconds_per_training"]["keras"] < tc["seconds_per_training"]["keras_legacy"] / 5
    assert tc["speedup_vs_legacy"] > 5


def test_label_privacy_study_runs_both_channels(quick: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    rows = quick[0]["labels"]["rows"]
    assert {r["label_epsilon"] for r in rows} == {0.0, 2.0}
    for r in rows:
        assert r["test"] > 0.3  # four classes: chance is 0.25, also with randomised labels
        assert 0.0 <= r["auc_ev_labels"] <= 1.0 or r["auc_ev_labels"] != r["auc_ev_labels"]  # NaN when a class is absent


def test_seed_study_compares_the_trainers(quick: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    sd = quick[0]["seeds"]
    assert sd["digits"] and sd["household"]
    for r in sd["household"]:
        assert r["edge"] > 0.4 and r["edge"] >= r["alone_mean"] - NOISE
        assert 0.4 < r["ceiling_central_raw"] <= 1.0
    for r in sd["digits"]:
        assert r["edge"] >= r["nearest_mean"] - 0.1  # the class-statistics head tracks the reference


def test_digits_accuracy_grows_with_epsilon(quick: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    rows = [r for r in quick[0]["digits"]["rows"] if r["variant"] == "paper"]
    acc = {r["epsilon"]: r["test"] for r in rows}
    order = sorted(acc, key=lambda k: float("inf") if k == "inf" else float(k))
    for lo, hi in zip(order, order[1:], strict=False):
        assert acc[lo] <= acc[hi] + NOISE, (lo, hi, acc)
    assert acc["inf"] > 0.8  # the non-private head on the int8 front
    assert acc[order[0]] < acc["inf"]  # the noise costs something at the smallest epsilon
    assert quick[0]["digits"]["central"]["test"] > 0.9


def test_household_federation_learns(quick: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    row = quick[0]["household"]["rows"][0]
    assert row["test"] > 0.4  # four classes: chance is 0.25
    assert row["test"] >= row["floor_mean"] - NOISE  # pooling the crowd beats training alone


def test_multi_krum_beats_fedavg_under_scaling(quick: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    runs = quick[0]["attacks"]["runs"]
    final = {(r["rule"], r["attack"]): r["test"] for r in runs if not r["reputation"]}
    assert final[("multi_krum", "scale_x10")] > final[("fedavg", "scale_x10")] + NOISE
    assert final[("multi_krum", "scale_x10")] >= final[("multi_krum", "none")] - NOISE
    kept = next(r for r in runs if r["rule"] == "multi_krum" and r["attack"] == "scale_x10")["attackers_kept"]
    assert kept[-1] == 0  # Multi-Krum drops the scaled updates


def test_inference_attack_reads_the_clear_label_more_than_the_noisy_features(quick: tuple[dict, Path]) -> None:  # type: ignore[type-arg]
    """What docs/quality.md says of the attribute-inference attack at epsilon 4: a label sent in
    clear gives the home's consumption level away (R² well above 0), the noisy features leak less
    than the label but not nothing, and together they tell at least what the label tells."""
    (row,) = quick[0]["inference"]
    assert row["epsilon"] == "4" and row["victims"] == quick[0]["plan"]["victim_homes"]
    assert row["r2_label"] > 0.1
    assert 0.0 < row["r2_features"] < row["r2_label"]
    assert row["r2_both"] >= row["r2_label"] - NOISE
