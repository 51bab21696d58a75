"""Wall time and peak memory of ``crowdfl demo``, beside the floor any TensorFlow process pays.

    .venv/bin/python bench/demo.py              # the README's demo (10 agents, 2 edges, 3 rounds), seeds 0 and 1
    .venv/bin/python bench/demo.py --quick      # 3 agents, 1 edge, 1 round, one seed (proves the script runs)

Each run is a fresh process, ``python -m crowdfl_sim.cli demo --exit-when-done --json FILE``,
timed from start to exit; its peak resident memory is the child's ``ru_maxrss``. The baseline,
measured in the same run, is a process that only imports TensorFlow and Keras: the demo runs
every role in one process and trains with TensorFlow, so this is the part of its time and memory
no crowdfl code can remove. Figures go to bench/results/demo.json (``demo.quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results_io import write_result  # noqa: E402


def timed_child(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """(wall seconds, peak RSS in MB, the finished process) of one child run alone."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    # RUSAGE_CHILDREN is the maximum over all waited-for children, so each run gets its own
    # grandchild: a small wrapper that reports its child's peak.
    wrapper = (
        "import resource, subprocess, sys, json, time;"
        "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "print(json.dumps({'wall': time.perf_counter() - t, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
        " 'rc': p.returncode, 'out': p.stdout[-4000:], 'err': p.stderr[-4000:]}))"
    )
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    rep = json.loads(done.stdout.strip().splitlines()[-1])
    proc = subprocess.CompletedProcess(cmd, rep["rc"], rep["out"], rep["err"])
    return float(rep["wall"]), rep["maxrss_kb"] / 1024.0, proc


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1", help="demo seeds, comma-separated; one demo run each (default: 0,1)")
    p.add_argument("--agents", type=int, default=10, help="agents in each demo (count; default: 10, as `crowdfl demo`)")
    p.add_argument("--edges", type=int, default=2, help="edge servers in each demo (count; default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds in each demo (count; default: 3)")
    p.add_argument("--quick", action="store_true",
                   help="3 agents, 1 edge, 1 round, seed 0, 13 samples per round; writes demo.quick.json")
    args = p.parse_args(argv)
    extra: list[str] = []
    if args.quick:
        args.seeds, args.agents, args.edges, args.rounds = "0", 3, 1, 1
        extra = ["--samples-per-round", "13", "--days", "28"]
    seeds = [int(s) for s in args.seeds.split(",")]

    base_wall, base_rss, base = timed_child([sys.executable, "-c", "import tensorflow, keras; tensorflow.constant(1.0) + 1"])
    if base.returncode != 0:
        print(base.stderr, file=sys.stderr)
        return 1
    print(f"baseline: import TensorFlow + Keras and run one op: {base_wall:.1f} s, peak RSS {base_rss:.0f} MB")

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="crowdfl-bench-demo-") as tmp:
        for seed in seeds:
            out = Path(tmp) / f"demo-{seed}.json"
            cmd = [sys.executable, "-m", "crowdfl_sim.cli", "demo", "--exit-when-done", "--json", str(out), "--seed", str(seed),
                   "--agents", str(args.agents), "--edges", str(args.edges), "--rounds", str(args.rounds), *extra]
            wall, rss, proc = timed_child(cmd)
            if proc.returncode != 0 or not out.exists():
                print(proc.stdout, proc.stderr, file=sys.stderr)
                return 1
            res = json.loads(out.read_text())
            runs.append({"seed": seed, "wall_s": wall, "peak_rss_mb": rss, "audit_ok": res["audit_ok"],
                         "final_accuracy": res["rounds"][-1]["accuracy"], "initial_accuracy": res["initial_accuracy"],
                         "accuracy_per_round": [r["accuracy"] for r in res["rounds"]], "samples_released": res["samples_released"],
                         "max_epsilon_per_hour": res["max_epsilon_per_hour"], "max_epsilon_per_day": res["max_epsilon_per_day"],
                         "demo_reported_seconds": res["seconds"]})
            print(f"demo seed {seed}: {wall:.1f} s wall, peak RSS {rss:.0f} MB, accuracy {runs[-1]['initial_accuracy']:.3f} (initial head) "
                  f"-> {runs[-1]['final_accuracy']:.3f}, "
                  f"audit {'ok' if res['audit_ok'] else 'FAILED'}")

    walls, rsss = [r["wall_s"] for r in runs], [r["peak_rss_mb"] for r in runs]
    figures = {
        "agents": args.agents, "edges": args.edges, "rounds": args.rounds, "seeds": seeds,
        "runs": runs, "wall_s": spread(walls), "peak_rss_mb": spread(rsss),
        "baseline_tensorflow_import": {"wall_s": base_wall, "peak_rss_mb": base_rss},
        "ru_maxrss_unit": "KiB on Linux, reported here in MB (2^20 bytes)",
    }
    print(f"demo: {figures['wall_s']['mean']:.1f} s wall (min {min(walls):.1f}, max {max(walls):.1f}), "
          f"peak RSS {figures['peak_rss_mb']['mean']:.0f} MB, over {len(seeds)} seed(s); "
          f"a bare TensorFlow process: {base_wall:.1f} s, {base_rss:.0f} MB")
    print(f"figures: {write_result('demo', figures, quick=args.quick)}")
    return 0 if all(r["audit_ok"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
