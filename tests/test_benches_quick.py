"""The benches still run: each one's --quick mode, end to end, writes its figures.

Quick runs prove the scripts work on today's code; their figures (``bench/results/<name>.quick.json``,
not committed) are only checked for shape. The committed full results back the README
(tests/test_readme_figures.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.realparts import find_executable, require_real_part

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run_quick(script: str, name: str, timeout: float) -> dict[str, Any]:
    started = time.time()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, script, "--quick"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    path = ROOT / "bench" / "results" / f"{name}.quick.json"
    assert path.exists() and path.stat().st_mtime >= started - 1, f"{script} --quick did not write {path}"
    record = json.loads(path.read_text())
    assert record["quick"] is True and record["bench"] == name and script in record["command"]
    return record["figures"]  # type: ignore[no-any-return]


def test_aggregation_bench_quick() -> None:
    figures = run_quick("bench/aggregation.py", "aggregation", 600)
    rules = {r["rule"].split()[0] for r in figures["rows"]}
    assert rules == {"fedavg", "coordinate_median", "trimmed_mean", "multi_krum"}
    assert all(r["crowdfl_s"] > 0 for r in figures["rows"])
    assert all("kept only honest: True" in r["note"] for r in figures["rows"] if r["rule"].startswith("multi_krum"))


@pytest.mark.realpart
def test_ingest_bench_quick() -> None:
    require_real_part("mosquitto", find_executable("mosquitto") is not None, "apt-get install mosquitto")
    figures = run_quick("bench/ingest.py", "ingest", 900)
    assert figures["edge"]["0"]["stats"]["accepted"] == figures["messages"] == 400
    assert 0 < figures["best_ratio"] and figures["raw_median_msg_s"] > 0
    assert len(figures["training"]["edge_train_job_s"]) == 1


def test_demo_bench_quick() -> None:
    figures = run_quick("bench/demo.py", "demo", 1200)
    (run,) = figures["runs"]
    assert run["audit_ok"] and run["wall_s"] > 0
    assert run["peak_rss_mb"] > figures["baseline_tensorflow_import"]["peak_rss_mb"] * 0.5


def test_edge_trainer_bench_quick() -> None:
    figures = run_quick("bench/edge_trainer.py", "edge_trainer", 900)
    for n in ("39", "768"):
        row = figures["sizes"][n]
        assert row["ours_ms"]["median"] > 0 and row["legacy_ms"]["median"] > 0
        assert row["ratio_legacy_over_ours"] == row["legacy_ms"]["median"] / row["ours_ms"]["median"]


@pytest.mark.realpart
def test_image_bench_quick() -> None:
    """bench/image.py --quick: the cached image (built by the hardware tests' fixture otherwise),
    one virt boot through a round with the shipped unit and one with its memory settings unset."""
    tools = ("qemu-system-aarch64", "debugfs", "mcopy", "debootstrap")
    missing = [t for t in tools if find_executable(t) is None]
    require_real_part("qemu-arm64", not missing, f"missing {', '.join(missing)} (run .ci/install-system.sh)")
    require_real_part("qemu-arm64", os.geteuid() == 0, "the image bench builds the image: needs root")
    figures = run_quick("bench/image.py", "image", 3600)
    assert figures["build"]["cached_rerun_s"] < 60
    assert figures["memory_env"] and "raspi3b" not in figures
    for key in ("rss_mb", "control_rss_mb", "agent_ready_s"):
        assert figures["virt"][key]["n"] == 1 and figures["virt"][key]["min"] > 0, (key, figures["virt"][key])
