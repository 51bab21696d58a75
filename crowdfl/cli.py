"""The ``crowdfl`` command: the demo and the audit (the roles have their own commands)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from .sim.demo import DemoOptions, run_demo

    opts = DemoOptions(
        agents=args.agents, edges=args.edges, rounds=args.rounds, epsilon=args.epsilon,
        samples_per_round=args.samples_per_round, history_days=args.days, aggregation=args.rule,
        seed=args.seed, workdir=args.workdir, keep_workdir=args.workdir is not None,
    )
    if opts.agents < 1 or opts.edges < 1 or opts.rounds < 1 or opts.epsilon <= 0:
        print("crowdfl demo: agents, edges and rounds must be at least 1 and epsilon positive", file=sys.stderr)
        return 2
    result = run_demo(opts)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2, default=str))
    return 0 if result.audit_ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crowdfl", description="Crowdsourced federated learning for IoT devices.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every component at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a full crowdsourcing task on one machine with the embedded parts")
    demo.add_argument("--agents", type=int, default=10)
    demo.add_argument("--edges", type=int, default=2)
    demo.add_argument("--rounds", type=int, default=3)
    demo.add_argument("--epsilon", type=float, default=4.0, help="per-sample Laplace budget of the features")
    demo.add_argument("--samples-per-round", type=int, default=128)
    demo.add_argument("--days", type=int, default=42, help="days of usage history per household")
    demo.add_argument("--rule", default="fedavg", choices=["fedavg", "multi_krum", "coordinate_median", "trimmed_mean"])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workdir", type=Path, default=None, help="keep all state here (default: a temporary folder, removed)")
    demo.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
