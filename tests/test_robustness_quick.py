"""`python -m bench.quality.robustness --quick` end to end, with figures that could fail.

One seed, 10 customers, 4 rounds, two attacks at 30 %: inner-product manipulation and free riders,
the old default (plain Multi-Krum + closeness reputation) beside the defended default.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    pytest.importorskip("scipy", reason="needs scipy (the bench extra)")
    out = tmp_path_factory.mktemp("robustness")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.quality.robustness", "--quick", "--out", str(out), "--no-docs"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "report.md").read_text().startswith("## Robustness results")
    return json.loads((out / "results.json").read_text())


def _row(res: dict, attack: str, defended: bool) -> dict:  # type: ignore[type-arg]
    return next(r for r in res["rows"] if r["attack"] == attack and r["defended"] == defended)


def test_free_riders_earn_nothing_under_the_defences_only(quick: dict) -> None:  # type: ignore[type-arg]
    assert _row(quick, "free_rider", True)["attacker_reward_share"]["mean"] == 0.0
    # the closeness reputation pays them (the measurement can see it)
    assert _row(quick, "free_rider", False)["attacker_reward_share"]["mean"] > 0.1


def test_inner_product_attackers_flagged_and_harmless_when_defended(quick: dict) -> None:  # type: ignore[type-arg]
    defended, plain = _row(quick, "inner_product", True), _row(quick, "inner_product", False)
    assert all(f is not None and f <= 3 for f in defended["rounds_to_flag"])
    assert defended["gap_to_control"] < 0.03
    # they earn nothing under the defences; without them the closeness reputation pays them. (Plain
    # Multi-Krum itself no longer collapses under this attack since the default head became the
    # class-statistics head: docs/robustness.md, 0.592 at 30 %, so accuracy is not compared here.)
    assert defended["attacker_reward_share"]["mean"] == 0.0 < plain["attacker_reward_share"]["mean"]
    assert defended["honest_excluded"] == 0
