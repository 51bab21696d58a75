"""``crowdfl-coordinator``: provision, register participants, serve (API + rounds + anchoring), audit."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from crowdfl.config import load_config
from crowdfl.errors import CrowdflError
from crowdfl.identity import Identity, PublicIdentity, short_id
from crowdfl.mqtt import MqttLink, MqttSettings
from crowdfl.runtime import add_config_option, setup_logging, stop_on_signals

from .defence import DefenceConfig
from .reputation import ReputationConfig, TrustReputationConfig

log = logging.getLogger("crowdfl.coordinator")


@dataclass(frozen=True)
class ChainSettings:
    kind: str = "embedded"  # embedded (eth-tester, in-process, lost on exit) | rpc
    rpc_url: str = ""
    private_key_file: Path | None = None  # hex key of the manufacturer's sealer/owner account
    chain_id: int | None = None
    confirmations: int = 0
    gas_price_wei: int | None = None
    poa: bool = True


@dataclass(frozen=True)
class CoordinatorConfig:
    state_dir: Path = Path("/var/lib/crowdfl-coordinator")
    database_url: str = ""
    api_host: str = "127.0.0.1"
    api_port: int = 8470
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    chain: ChainSettings = field(default_factory=ChainSettings)
    round_timeout_s: float = 3600.0
    byzantine_fraction: float = 0.2
    trim_beta: float = 0.1
    # bearer token for the admin API (register/remove participants, publish tasks); empty: disabled
    admin_token: str = ""
    max_participants: int = 0  # customers per round; 0: every eligible one
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    # defended rounds (coordinator/defence.py) and the reputation they feed; docs/robustness.md
    defence: DefenceConfig = field(default_factory=DefenceConfig)
    trust: TrustReputationConfig = field(default_factory=TrustReputationConfig)

    @property
    def key_file(self) -> Path:
        return self.state_dir / "identity.json"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'coordinator.sqlite'}"


def load(path: Path | None) -> CoordinatorConfig:
    return load_config(CoordinatorConfig, path, "CROWDFL_COORDINATOR")


def _contracts(cfg: CoordinatorConfig):  # type: ignore[no-untyped-def]
    """Connect to the chain; deploy the contracts once and remember their addresses."""
    from .chain import ChainConfig, ChainError, connect
    from .contracts import CrowdContracts

    key = None
    if cfg.chain.private_key_file is not None:
        key = Path(cfg.chain.private_key_file).read_text().strip()
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
    from .task_model import TaskDesign, design_task

    ident, _ = Identity.load_or_create(cfg.key_file)
    contracts = _contracts(cfg)
    link = MqttLink(cfg.mqtt, f"coordinator-{short_id(ident.node_id)}", [])
    link.start()
    store = LocalContentStore(cfg.state_dir / "store")
    coord = Coordinator(
        ident, make_sessions(cfg.db_url), store, contracts, lambda t, p, r: link.publish(t, p, qos=1, retain=r),
        byzantine_fraction=cfg.byzantine_fraction, trim_beta=cfg.trim_beta,
        policy=LedgerPolicy(cfg.reputation, cfg.max_participants, cfg.trust), defence=cfg.defence,
    )
    if new_task is not None and not coord.running_tasks():
        designed = design_task(TaskDesign(rounds=int(new_task["rounds"]), epsilon=new_task["epsilon"]), datetime(2026, 9, 1, tzinfo=UTC))
        coord.publish_task(designed.spec, designed.front_tflite, designed.initial)
        log.info("published task %s", designed.spec.task_id)
    coord.sync_registry()
    coord.republish()
    if not cfg.admin_token:
        log.warning("admin_token is not set: the admin API (participants, tasks) refuses every request")
    api = ApiServer(create_app(coord, cfg.admin_token), cfg.api_host, cfg.api_port)
    api.start()
    log.info("coordinator %s serving on %s", short_id(ident.node_id), api.url)
    stop = stop_on_signals()
    while not stop.is_set():
        for task_id in coord.running_tasks():
            try:
                if task_id not in coord.evaluators:  # also tasks published through the admin API
                    coord.evaluators[task_id] = HeldOut(*_held_out(coord, store, task_id))
                if task_id not in coord.roots:  # the defences' root dataset (coordinator/defence.py)
                    coord.roots[task_id] = _root_data(coord, store, task_id)
                summary = coord.step(task_id, cfg.round_timeout_s)
                if summary is not None:
                    log.info("round %d closed: accuracy %.3f, %d accepted, %d rejected", summary.round, summary.accuracy, summary.accepted, summary.rejected)
            except Exception:  # one task's failure must not stop the others or the API
                log.exception("task %s: step failed; retrying", task_id[:12])
        coord.anchor_pending()  # retried until the chain takes it, also for tasks already done
        stop.wait(1.0)
    api.stop()
    link.stop()
    log.info("coordinator stopped cleanly at %s", time.strftime("%H:%M:%S"))
    return 0


def _root_data(coord, store, task_id: str):  # type: ignore[no-untyped-def]
    """The manufacturer's root homes for FLTrust's reference update: generated, disjoint from the
    lab, the held-out homes and the customers; noised as a device would (coordinator/reference.py)."""
    import numpy as np

    from crowdfl import household
    from crowdfl.task import task_samples

    from .reference import root_data
    from .task_model import clean_features

    spec = coord.spec(task_id)
    start = datetime(2026, 9, 1, tzinfo=UTC)
    homes = household.generate_households(12, 515151, start, 42, 3600)
    parts = [task_samples(spec, m, int(start.timestamp() // 3600)) for _, m in homes]
    inputs = np.concatenate([p.inputs for p in parts])
    labels = np.concatenate([p.labels for p in parts]).astype(np.int64)
    order = np.random.default_rng(515151).permutation(len(labels))
    return root_data(clean_features(store.get(spec.front_model_hash), spec, inputs[order]), labels[order], spec, 515151)


def _held_out(coord, store, task_id: str):  # type: ignore[no-untyped-def]
    """The manufacturer's own test homes (generated, disjoint from the lab and from customers)."""
    import numpy as np

    from crowdfl import household
    from crowdfl.task import task_samples

    from .task_model import clean_features

    spec = coord.spec(task_id)
    start = datetime(2026, 9, 1, tzinfo=UTC)
    homes = household.generate_households(8, 424242, start, 42, 3600)
    parts = [task_samples(spec, m, int(start.timestamp() // 3600)) for _, m in homes]
    inputs = np.concatenate([p.inputs for p in parts])
    labels = np.concatenate([p.labels for p in parts]).astype(np.int64)
    return clean_features(store.get(spec.front_model_hash), spec, inputs), labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crowdfl-coordinator", description="The manufacturer's crowdfl coordinator.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    provision_cmd = sub.add_parser("provision", help="generate the coordinator's keys and print the public part for devices and edges")
    srv = sub.add_parser("serve", help="API, round driver and anchoring (as the systemd service does)")
    srv.add_argument("--new-task", action="store_true", help="design and publish a task if none is running")
    srv.add_argument("--rounds", type=int, default=5)
    srv.add_argument("--epsilon", type=float, default=4.0)
    reg = sub.add_parser("register", help="register a device or an edge server (database and chain)")
    reg.add_argument("role", choices=["device", "edge"])
    reg.add_argument("node_id")
    reg.add_argument("enc_key")
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
                pub = PublicIdentity(bytes.fromhex(args.node_id), bytes.fromhex(args.enc_key))
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
