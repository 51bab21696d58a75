"""The ``crowdfl`` command: the demo and the audit (the roles have their own commands)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from dataclasses import asdict
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo

    opts = DemoOptions(
        agents=args.agents, edges=args.edges, rounds=args.rounds, epsilon=args.epsilon,
        samples_per_round=args.samples_per_round, history_days=args.days, aggregation=args.rule,
        seed=args.seed, workdir=args.workdir, keep_workdir=args.workdir is not None,
        hold=None if args.exit_when_done else threading.Event(),
    )
    if opts.agents < 1 or opts.edges < 1 or opts.rounds < 1 or opts.epsilon <= 0:
        print("crowdfl demo: agents, edges and rounds must be at least 1 and epsilon positive", file=sys.stderr)
        return 2
    result = run_demo(opts)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2, default=str))
    return 0 if result.audit_ok else 1


def _audit(args: argparse.Namespace) -> int:
    """Read-only: the chain (any JSON-RPC endpoint) and a copy of the content store, nothing else."""
    import secrets

    from coordinator.audit import audit_model
    from coordinator.chain import ChainConfig, ChainError, connect
    from coordinator.contracts import CrowdContracts
    from coordinator.store import LocalContentStore
    from crowdfl.messages import is_hex64

    model_hash = args.model_hash.lower()
    if not is_hex64(model_hash):
        print("crowdfl audit: MODEL_HASH must be a sha256 hex digest (64 characters)", file=sys.stderr)
        return 2
    if not args.store.is_dir():
        print(f"crowdfl audit: no store directory {args.store}", file=sys.stderr)
        return 2
    try:
        addresses = json.loads(args.addresses.read_text())
        if not isinstance(addresses, dict):
            raise ValueError("expected a JSON object of contract name -> address")
    except (OSError, ValueError) as exc:
        print(f"crowdfl audit: cannot read the contract addresses from {args.addresses}: {exc}", file=sys.stderr)
        return 2
    try:
        # a throwaway key: ChainClient wants a signer, the audit never sends a transaction
        client = connect(ChainConfig(kind="rpc", rpc_url=args.rpc, private_key="0x" + secrets.token_hex(32),
                                     chain_id=args.chain_id, poa=not args.no_poa))
        contracts = CrowdContracts.at(client, addresses, from_block=args.from_block)
    except (ChainError, ValueError) as exc:
        print(f"crowdfl audit: cannot use the chain at {args.rpc}: {exc}", file=sys.stderr)
        return 2
    report = audit_model(contracts, LocalContentStore(args.store), model_hash)
    for line in report.lines():
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2, default=str))
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crowdfl", description="Crowdsourced federated learning for IoT devices.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every component at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a full crowdsourcing task on one machine with the embedded parts",
                          description="One full task on this machine: broker, chain, coordinator, edges and agents in one process.",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--agents", type=int, default=10, help="devices (customers), each with its own generated home and keys")
    demo.add_argument("--edges", type=int, default=2, help="edge servers; the devices are spread over them")
    demo.add_argument("--rounds", type=int, default=3, help="federated rounds of the task")
    demo.add_argument("--epsilon", type=float, default=4.0, help="per-sample Laplace budget of the released features (epsilon, unitless)")
    demo.add_argument("--samples-per-round", type=int, default=13,
                      help="fresh samples each device releases per round (the task releases a 24-hour window every 25 hours)")
    demo.add_argument("--days", type=int, default=42, help="days of usage history generated per household")
    demo.add_argument("--rule", default="fedavg", choices=["fedavg", "multi_krum", "coordinate_median", "trimmed_mean"],
                      help="the task's aggregation rule")
    demo.add_argument("--seed", type=int, default=0, help="seed of the homes, the task design and the noise")
    demo.add_argument("--workdir", type=Path, default=None, help="keep all state in this folder (none: a temporary folder, removed)")
    demo.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    demo.add_argument("--exit-when-done", action="store_true", help="stop after the audit instead of keeping the dashboard up")
    demo.set_defaults(func=_demo)
    audit = sub.add_parser("audit", help="re-verify a global model's provenance from a chain and a copy of the content store",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    audit.add_argument("model_hash", metavar="MODEL_HASH", help="sha256 of the global model to audit")
    audit.add_argument("--store", type=Path, required=True, help="a copy of the coordinator's content store (directory)")
    audit.add_argument("--rpc", required=True, help="JSON-RPC URL of any node of the chain")
    audit.add_argument("--addresses", type=Path, required=True, help="JSON file of the contract addresses (deployment.json)")
    audit.add_argument("--chain-id", type=int, default=None, help="refuse a node on another chain (EIP-155 chain id; none: accept any)")
    audit.add_argument("--from-block", type=int, default=0, help="scan events from this block number (the deployment's)")
    audit.add_argument("--no-poa", action="store_true", help="the chain is not Clique PoA (no extraData middleware)")
    audit.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    audit.set_defaults(func=_audit)
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
