"""Time crowdfl's aggregation rules against Flower's on the same arrays, in the same run.

Run in the Flower venv (bench/setup_flwr_venv.sh builds it):

    bench/.venv-flwr/bin/python bench/aggregation.py            # 1,000 x 100,000, 1-2 min
    bench/.venv-flwr/bin/python bench/aggregation.py --quick    # 200 x 20,000, seconds

On a machine shared with other work, pin BLAS to one thread (``OPENBLAS_NUM_THREADS=1``, as the
committed result was): OpenBLAS threads spin while they wait, and on an oversubscribed 2-core host
that made Krum's Gram matrix 40 times slower (5.5 s instead of 0.12 s at n = 200).

Figures go to bench/results/aggregation.json (``aggregation.quick.json`` for --quick).

crowdfl's coordinator/aggregation.py is imported by path (it needs only numpy), so this venv
does not need the project's dependencies. Flower's rules are the pure functions in
flwr/server/strategy/aggregate.py that its FedAvg / Krum / FedMedian / FedTrimmedAvg strategies
call. Both sides get the same list-of-arrays input, so both pay for their own flattening.
Without flwr the script still times crowdfl's side.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results_io import write_result  # noqa: E402 (stdlib only: fine in the Flower venv)


def load_crowdfl_aggregation() -> ModuleType:
    path = ROOT / "coordinator" / "aggregation.py"
    spec = importlib.util.spec_from_file_location("crowdfl_aggregation", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while decorating
    spec.loader.exec_module(module)
    return module


def load_flower() -> ModuleType | None:
    try:
        return importlib.import_module("flwr.server.strategy.aggregate")
    except ImportError:
        return None


@dataclass(frozen=True)
class Workload:
    updates: list[list[np.ndarray]]
    samples: list[int]
    honest: tuple[int, ...]


def layer_shapes(n_params: int) -> list[tuple[int, ...]]:
    """A small dense net 120 -> h -> 4 (bias on the hidden layer) with exactly n_params."""
    hidden = n_params // 125
    shapes: list[tuple[int, ...]] = [(120, hidden), (hidden,), (hidden, 4)]
    rest = n_params - 125 * hidden
    return [*shapes, (rest,)] if rest else shapes


def make_workload(n: int, n_params: int, f: int, seed: int) -> Workload:
    """Honest updates around one model, f attackers shifted far away (all float32)."""
    rng = np.random.default_rng(seed)
    shapes = layer_shapes(n_params)
    base = [rng.normal(0.0, 0.1, s).astype(np.float32) for s in shapes]
    attackers = set(rng.choice(n, size=f, replace=False).tolist())
    updates = []
    for i in range(n):
        shift = 1.0 if i in attackers else 0.0
        updates.append(
            [(b + shift + rng.normal(0.0, 0.01, b.shape)).astype(np.float32) for b in base]
        )
    samples = rng.integers(10, 1000, size=n).tolist()
    honest = tuple(i for i in range(n) if i not in attackers)
    return Workload(updates, samples, honest)


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def paired_times(
    ours: Callable[[], Any], theirs: Callable[[], Any] | None, repeat: int
) -> tuple[list[float], Any, list[float], Any]:
    """Both sides run ``repeat`` times, alternating (ours, theirs, ours, ...), so a load change
    on a shared machine hits both alike; returns every time and each side's last output."""
    t_ours: list[float] = []
    t_theirs: list[float] = []
    ours_out = theirs_out = None
    for _ in range(repeat):
        t, ours_out = timed(ours)
        t_ours.append(t)
        if theirs is not None:
            t, theirs_out = timed(theirs)
            t_theirs.append(t)
    return t_ours, ours_out, t_theirs, theirs_out


def max_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b, strict=True))


def flower_krum_selection(flower: ModuleType, work: Workload, f: int, m: int) -> tuple[int, ...]:
    """Which updates Flower's Multi-Krum averages (re-derived with its own distance code)."""
    distances = flower._compute_distances(work.updates)
    closest = max(1, len(work.updates) - f - 2)
    scores = [np.sum(row[np.argsort(row)[1 : closest + 1]]) for row in distances]
    return tuple(sorted(int(i) for i in np.argsort(scores)[::-1][len(scores) - m :]))


@dataclass(frozen=True)
class Row:
    rule: str
    n: int
    ours: float  # best of `repeat`
    flower: float | None
    diff: float | None
    note: str
    repeat: int = 1
    ours_median: float = 0.0
    flower_median: float | None = None
    ours_times: tuple[float, ...] = ()
    flower_times: tuple[float, ...] = ()


def run(args: argparse.Namespace) -> list[Row]:
    ours = load_crowdfl_aggregation()
    flower = load_flower()
    f = args.n // 10
    print(f"building {args.n} updates x {args.params:,} float32 params, f = {f} attackers ...")
    work = make_workload(args.n, args.params, f, args.seed)
    results = list(zip(work.updates, work.samples, strict=True))
    rows: list[Row] = []

    def measure(
        rule: str,
        n: int,
        ours_call: Callable[[], Any],
        flower_call: Callable[[], Any] | None,
        repeat: int,
        note: str = "",
    ) -> Any:
        """Both sides get the same number of runs (``repeat``), interleaved."""
        times, ours_out, flower_times, flower_out = paired_times(ours_call, flower_call, repeat)
        t_ours, t_flower, diff = min(times), None, None
        flower_median = None
        if flower_call is not None:
            t_flower, flower_median = min(flower_times), statistics.median(flower_times)
            diff = max_abs_diff(ours_out.weights, flower_out)
        rows.append(Row(rule, n, t_ours, t_flower, diff, note, repeat, statistics.median(times), flower_median,
                        tuple(times), tuple(flower_times)))
        shown = f"{t_flower:7.3f}s (median {flower_median:.3f})" if t_flower is not None else "      -"
        print(f"  {rule:<20} n={n:<5} best of {repeat}: crowdfl {t_ours:7.3f}s (median {statistics.median(times):.3f})  flower {shown}", flush=True)
        return ours_out

    beta = args.beta
    simple: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]] = [
        (
            "fedavg",
            lambda: ours.aggregate("fedavg", work.updates, work.samples),
            None if flower is None else lambda: flower.aggregate(results),
        ),
        (
            "coordinate_median",
            lambda: ours.aggregate("coordinate_median", work.updates, work.samples),
            None if flower is None else lambda: flower.aggregate_median(results),
        ),
        (
            f"trimmed_mean b={beta}",
            lambda: ours.aggregate("trimmed_mean", work.updates, work.samples, beta=beta),
            None if flower is None else lambda: flower.aggregate_trimmed_avg(results, beta),
        ),
    ]
    for rule, ours_call, flower_call in simple:
        measure(rule, args.n, ours_call, flower_call, args.repeat)
    # Flower's Krum is quadratic in Python (minutes at n = 1,000): one run each, for both sides

    # Flower's pairwise distances are a Python double loop over n^2 pairs: time a subset first.
    small_n = min(args.krum_small_n, args.n)
    small = Workload(
        work.updates[:small_n],
        work.samples[:small_n],
        tuple(i for i in work.honest if i < small_n),
    )
    small_f = small_n - len(small.honest)  # the attackers that landed in the subset
    small_results = results[:small_n]
    out = measure(
        f"multi_krum f={small_f}",
        small_n,
        lambda: ours.aggregate("multi_krum", small.updates, small.samples, f=small_f),
        None
        if flower is None
        else lambda: flower.aggregate_krum(small_results, small_f, small_n - small_f),
        1,
    )
    note = f"kept only honest: {set(out.kept) <= set(small.honest)}"
    if flower is not None:
        theirs = flower_krum_selection(flower, small, small_f, small_n - small_f)
        note += f"; same selection as Flower: {theirs == out.kept}"
    rows[-1] = replace(rows[-1], note=note)

    if small_n < args.n:
        flower_small = rows[-1].flower
        estimate = None if flower_small is None else flower_small * (args.n / small_n) ** 2
        run_flower = flower is not None and estimate is not None
        run_flower = run_flower and estimate <= args.flower_krum_budget
        out = measure(
            f"multi_krum f={f}",
            args.n,
            lambda: ours.aggregate("multi_krum", work.updates, work.samples, f=f),
            (lambda: flower.aggregate_krum(results, f, args.n - f))
            if run_flower and flower is not None
            else None,
            1,
        )
        note = f"kept only honest: {set(out.kept) <= set(work.honest)}"
        if estimate is not None:
            note += f"; Flower estimated {estimate:.0f}s from n={small_n}"
            note += "" if run_flower else " (over --flower-krum-budget, not run)"
        rows[-1] = replace(rows[-1], note=note)
    return rows


def print_table(rows: list[Row], flower_version: str | None) -> None:
    print()
    print("| rule | n | runs each | crowdfl best (median) s | Flower best (median) s | Flower / crowdfl (best) | max abs diff | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        flower = f"{r.flower:.3f} ({r.flower_median:.3f})" if r.flower is not None else "-"
        ratio = f"{r.flower / r.ours:.1f}x" if r.flower is not None else "-"
        diff = f"{r.diff:.2e}" if r.diff is not None else "-"
        print(f"| {r.rule} | {r.n} | {r.repeat} | {r.ours:.3f} ({r.ours_median:.3f}) | {flower} | {ratio} | {diff} | {r.note} |")
    print()
    print(
        "Flower / crowdfl > 1: crowdfl is faster. Flower's Krum computes all n^2 ordered pair\n"
        "distances in a Python loop (each pair twice), hence the quadratic growth; crowdfl uses\n"
        "the Gram matrix. crowdfl's times include its validation and flattening. Both sides\n"
        "run the same number of times, alternating."
    )
    print(
        f"flwr {flower_version or 'not installed'}, numpy {np.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} cpus"
    )


def describe_threads() -> None:
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if var in os.environ:
            print(f"  {var}={os.environ[var]}")
    try:
        from threadpoolctl import threadpool_info  # type: ignore[import-not-found]
    except ImportError:
        return
    for pool in threadpool_info():
        print(
            f"  BLAS: {pool.get('internal_api')} {pool.get('version')} "
            f"{pool.get('architecture')} threads={pool.get('num_threads')}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/aggregation.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="number of updates (count)")
    parser.add_argument("--params", type=int, default=100_000, help="float32 parameters per update (count)")
    parser.add_argument("--beta", type=float, default=0.1, help="trimmed-mean cut per end (fraction of n)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each side, interleaved, for the non-Krum rules (count)")
    parser.add_argument(
        "--krum-small-n",
        type=int,
        default=200,
        help="n at which Flower's quadratic Krum is measured first (count)",
    )
    parser.add_argument(
        "--flower-krum-budget",
        type=float,
        default=150.0,
        help="run Flower's Krum at full n only if estimated below this (seconds)",
    )
    parser.add_argument("--seed", type=int, default=2024, help="seed of the synthetic updates")
    parser.add_argument("--quick", action="store_true", help="200 x 20,000, best of 1, for a smoke run; writes aggregation.quick.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.params, args.krum_small_n, args.repeat = 200, 20_000, 50, 1
    flower = load_flower()
    version = None
    if flower is None:
        print(
            "flwr is not importable here: timing crowdfl only "
            "(run bench/setup_flwr_venv.sh, then use bench/.venv-flwr/bin/python)"
        )
    else:
        import flwr  # type: ignore[import-not-found]

        version = flwr.__version__
    describe_threads()
    rows = run(args)
    print_table(rows, version)
    figures = {
        "n": args.n, "params": args.params, "seed": args.seed, "repeat": args.repeat, "flwr": version,
        # BLAS threads matter for Krum's Gram matrix: spinning BLAS threads on a busy 2-core host
        # slow it many-fold, so the committed run pins one thread (OPENBLAS_NUM_THREADS=1)
        "blas_threads_env": {v: os.environ[v] for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if v in os.environ},
        "rows": [
            {"rule": r.rule, "n": r.n, "runs_each": r.repeat, "crowdfl_s": r.ours, "flower_s": r.flower,
             "crowdfl_median_s": r.ours_median, "flower_median_s": r.flower_median,
             "crowdfl_times_s": list(r.ours_times), "flower_times_s": list(r.flower_times),
             "max_abs_diff": r.diff, "note": r.note}
            for r in rows
        ],
    }
    print(f"figures: {write_result('aggregation', figures, quick=args.quick)}")


if __name__ == "__main__":
    main()
