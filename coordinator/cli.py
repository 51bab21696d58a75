"""``crowdfl-coordinator``: provision, register participants, serve (API + rounds + anchoring), audit."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from crowdfl import household
from crowdfl.errors import CrowdflError
from crowdfl.identity import Identity, PublicIdentity, short_id
from crowdfl.mqtt import MqttLink
from crowdfl.runtime import add_config_option, setup_logging, stop_on_signals
from crowdfl.secrets import resolve_secret

from .config import CoordinatorConfig, load

log = logging.getLogger("crowdfl.coordinator")


def _contracts(cfg: CoordinatorConfig):  # type: ignore[no-untyped-def]
    """Connect to the chain; deploy the contracts once and remember their addresses."""
    from .chain import ChainConfig, ChainError, connect
    from .contracts import CrowdContracts

    key = resolve_secret("", cfg.chain.private_key_file, "chain.private_key", "chain-key") or None
    client = connect(ChainConfig(
        kind=cfg.chain.kind, rpc_url=cfg.chain.rpc_url or None, private_key=key, chain_id=cfg.chain.chain_id,  # type: ignore[arg-type]
        confirmations=cfg.chain.confirmations, gas_price_wei=cfg.chain.gas_price_wei, poa=cfg.chain.poa,
    ))
    deployment = cfg.state_dir / "deployment.json"
    if cfg.chain.kind == "rpc" and deployment.exists():
        addresses = json.loads(deployment.read_text())
        try:
            return CrowdContracts.at(client, addresses)
        except ChainError as exc:
            if exc.reverted:
                raise
            log.warning("chain unreachable (%s): starting anyway, chain work is queued until it is back", exc)
            return CrowdContracts.at(client, addresses, check=False)
    contracts = CrowdContracts.deploy(client)
    if cfg.chain.kind == "rpc":
        deployment.write_text(json.dumps(contracts.addresses, indent=2))
    else:
        log.warning("embedded chain: state is lost when this process exits; use chain.kind = \"rpc\" in production")
    return contracts


def serve(cfg: CoordinatorConfig, new_task: dict[str, float] | None) -> int:
    import time

    from .api import ApiServer, create_app
    from .db import make_sessions
    from .ledger import LedgerPolicy
    from .service import Coordinator, HeldOut
    from .store import LocalContentStore
    from .task_model import TaskDesign, design_task, held_out_set

    ident, _ = Identity.load_or_create(cfg.key_file)
    contracts = _contracts(cfg)
    link = MqttLink(cfg.mqtt, f"coordinator-{short_id(ident.node_id)}", [])
    link.start()
    store = LocalContentStore(cfg.state_dir / "store")
    coord = Coordinator(
        ident, make_sessions(cfg.db_url), store, contracts, lambda t, p, r: link.publish(t, p, qos=1, retain=r),
        byzantine_fraction=cfg.byzantine_fraction, trim_beta=cfg.trim_beta,
        policy=LedgerPolicy(cfg.reputation, cfg.max_participants, cfg.trust), defence=cfg.defence, claim_limits=cfg.claims,
    )
    if new_task is not None and not coord.running_tasks():
        designed = design_task(TaskDesign(rounds=int(new_task["rounds"]), epsilon=new_task["epsilon"]), household.WORLD_START)
        coord.publish_task(designed.spec, designed.front_tflite, designed.initial)
        log.info("published task %s", designed.spec.task_id)
    coord.sync_registry()
    coord.republish()
    admin_token = cfg.admin_bearer
    if not admin_token:
        log.warning("admin_token is not set: the admin API (participants, tasks) refuses every request")
    api = ApiServer(create_app(coord, admin_token), cfg.api_host, cfg.api_port, cfg.http_limits)
    api.start()
    log.info("coordinator %s serving on %s", short_id(ident.node_id), api.url)
    stop = stop_on_signals()

    def prepare(task_id: str) -> None:
        if task_id not in coord.evaluators:  # also tasks published through the admin API
            spec = coord.spec(task_id)
            coord.evaluators[task_id] = HeldOut(*held_out_set(spec, store.get(spec.front_model_hash)))
        if task_id not in coord.roots:  # the defences' root dataset (coordinator/defence.py)
            coord.roots[task_id] = _root_data(coord.spec(task_id), store.get(coord.spec(task_id).front_model_hash))

    while not stop.is_set():
        drive_once(coord, cfg.round_timeout_s, prepare)
        stop.wait(1.0)
    api.stop()
    link.stop()
    log.info("coordinator stopped cleanly at %s", time.strftime("%H:%M:%S"))
    return 0


def drive_once(coord, round_timeout_s: float, prepare=None) -> None:  # type: ignore[no-untyped-def]
    """One pass of the serving loop: step every running task (close, aggregate, open the next round),
    then anchor what is pending. Nothing here may end the process: with the database or the chain
    down (a PostgreSQL restart, a stalled sealer) the pass logs why and the next pass retries;
    every step is idempotent and keeps its progress in the database."""
    try:
        task_ids = coord.running_tasks()
    except Exception as exc:  # the database is unreachable: nothing can be stepped this pass
        log.error("cannot list the running tasks (%s: %s); retrying", type(exc).__name__, str(exc).splitlines()[0][:300])
        return
    for task_id in task_ids:
        try:
            if prepare is not None:
                prepare(task_id)
            summary = coord.step(task_id, round_timeout_s)
            if summary is not None:
                log.info("round %d closed: accuracy %.3f, %d accepted, %d rejected", summary.round, summary.accuracy, summary.accepted, summary.rejected)
        except Exception:  # one task's failure must not stop the others or the API
            log.exception("task %s: step failed; retrying", task_id[:12])
    try:
        coord.anchor_pending()  # retried until the chain takes it, also for tasks already done
    except Exception as exc:
        log.error("anchoring pass failed (%s: %s); retrying", type(exc).__name__, str(exc).splitlines()[0][:300])


def _root_data(spec, front_tflite: bytes):  # type: ignore[no-untyped-def]
    """The manufacturer's root homes for FLTrust's reference update: generated, disjoint from the
    lab, the held-out homes and the customers (coordinator/reference.py)."""
    import numpy as np

    from .reference import root_data
    from .task_model import ROOT_HOMES, held_out_set

    features, labels = held_out_set(spec, front_tflite, ROOT_HOMES)
    order = np.random.default_rng(ROOT_HOMES.seed).permutation(len(labels))
    return root_data(features[order], labels[order], spec, ROOT_HOMES.seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crowdfl-coordinator", description="The manufacturer's crowdfl coordinator.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level (default: INFO)")
    sub = p.add_subparsers(dest="command", required=True)
    provision_cmd = sub.add_parser("provision", help="generate the coordinator's keys and print the public part for devices and edges")
    srv = sub.add_parser("serve", help="API, round driver and anchoring (as the systemd service does)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    srv.add_argument("--new-task", action="store_true", help="design and publish a task if none is running")
    srv.add_argument("--rounds", type=int, default=5, help="rounds of the task --new-task designs")
    srv.add_argument("--epsilon", type=float, default=4.0, help="per-sample privacy budget of the task --new-task designs (epsilon, unitless)")
    reg = sub.add_parser("register", help="register a device or an edge server (database and chain)")
    reg.add_argument("role", choices=["device", "edge"], help="what is registered: a customer's device or an edge server")
    reg.add_argument("node_id", help="its node id: the Ed25519 public key, 64 hex characters")
    reg.add_argument("enc_key", help="its X25519 public key, 64 hex characters")
    reg.add_argument("--edge", default=None, help="a device's edge server (node id)")
    reg.add_argument("--payout", default=None, help="a device's payout address for rewards")
    add_config_option(p, [provision_cmd, srv, reg], "TOML file (CROWDFL_COORDINATOR__* variables override it)")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = load(args.config)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        if args.command == "provision":
            ident, created = Identity.load_or_create(cfg.key_file)
            print(json.dumps({**ident.public.to_json(), "created": created}, indent=2))
        elif args.command == "register":
            from .db import make_sessions
            from .service import Coordinator
            from .store import LocalContentStore

            try:
                pub = PublicIdentity.from_hex(args.node_id, args.enc_key)
            except ValueError:
                raise CrowdflError("bad_key", "node_id and enc_key must be 64 hex characters each") from None
            ident, _ = Identity.load_or_create(cfg.key_file)
            coord = Coordinator(ident, make_sessions(cfg.db_url), LocalContentStore(cfg.state_dir / "store"), _contracts(cfg), lambda *a: None)
            coord.register([(pub, args.role, args.edge, args.payout)])
            print(f"{args.role} {args.node_id[:16]} registered")
        else:
            return serve(cfg, {"rounds": args.rounds, "epsilon": args.epsilon} if args.new_task else None)
    except (CrowdflError, OSError, ValueError) as exc:
        print(f"crowdfl-coordinator: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
