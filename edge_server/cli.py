"""``crowdfl-edge``: provision, register devices, run, status."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from crowdfl.artifacts import fetch_artifact
from crowdfl.errors import CrowdflError
from crowdfl.identity import Identity, PublicIdentity, short_id
from crowdfl.mqtt import MqttLink
from crowdfl.runtime import add_config_option, setup_logging, stop_on_signals

from .api import HttpServer, create_app
from .config import EdgeConfig, load
from .service import EdgeServer
from .store import EdgeStore
from .submit import CoordinatorClient

log = logging.getLogger("crowdfl.edge")


def _hex32(value: str, what: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower()):
        raise CrowdflError("bad_key", f"{what} must be 64 hex characters")
    return value.lower()


def run(cfg: EdgeConfig) -> int:
    ident, _ = Identity.load_or_create(cfg.key_file)
    try:
        coordinator = PublicIdentity(bytes.fromhex(cfg.coordinator.sign_key), bytes.fromhex(cfg.coordinator.enc_key or "00" * 32))
    except ValueError:
        raise CrowdflError("config", "coordinator.sign_key must be the coordinator's 64-hex Ed25519 key") from None
    short = short_id(ident.node_id)
    link = MqttLink(cfg.mqtt, f"edge-{short}", EdgeServer.subscriptions(short))
    server = EdgeServer(
        ident, coordinator, EdgeStore(cfg.db_url), link, CoordinatorClient(cfg.coordinator.url),
        lambda h: fetch_artifact(cfg.coordinator.url, h), seed=cfg.seed, drain_max=cfg.drain_max,
        drain_wait_s=cfg.drain_wait_s, resubmit_every_s=cfg.resubmit_every_s, ingest_workers=cfg.ingest_workers,
        retention_s=cfg.evidence_retention_days * 86400.0,
    )
    stop = stop_on_signals()
    http: HttpServer | None = None
    if cfg.http.enabled:
        try:
            http = HttpServer(create_app(server), cfg.http.host, cfg.http.port)
        except OSError as exc:
            raise CrowdflError("config", f"cannot serve http on {cfg.http.host}:{cfg.http.port}: {exc}") from None
    server.start()
    if http is not None:
        http.start()
        log.info("health and metrics on %s/healthz and %s/metrics", http.url, http.url)
    log.info("edge %s running; broker %s:%d, coordinator %s", short, cfg.mqtt.host, cfg.mqtt.port, cfg.coordinator.url)
    stop.wait()
    if http is not None:
        http.stop()
    server.stop()
    log.info("edge stopped cleanly: %d batches accepted, %d rejected, %d updates submitted",
             server.ingestor.stats.accepted, sum(server.ingestor.stats.rejected.values()), server.stats.submitted)
    return 0


def evidence(cfg: EdgeConfig, device: str, round_: int, task: str | None) -> list[dict[str, object]]:
    from crowdfl.messages import CODEC, TaskSpec

    from .evidence import export_evidence

    store = EdgeStore(cfg.db_url)
    try:
        specs = {s.task_id: s for s in (CODEC.decode(b, TaskSpec) for b in store.task_specs())}
        tasks = [task] if task else sorted(specs)
        out = []
        for t in tasks:
            if t not in specs:
                raise CrowdflError("unknown_task", f"task {t[:16]} is not known here")
            batches = store.batches(device, t, max_round=round_)
            if any(b.round == round_ for b in batches):
                out.append(export_evidence(batches, round_, specs[t].clip_l1))
        if not out:
            raise CrowdflError("no_evidence", f"no stored batch from {device[:16]} in round {round_}")
        return out
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crowdfl-edge", description="The crowdfl MEC edge server.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    run_cmd = sub.add_parser("run", help="ingest features, train, submit (as the systemd service does)")
    provision_cmd = sub.add_parser("provision", help="generate the keys and print what the manufacturer registers")
    status_cmd = sub.add_parser("status", help="what is stored and what was rejected, by reason")
    reg = sub.add_parser("register-device", help="accept feature batches from a device")
    reg.add_argument("node_id")
    reg.add_argument("enc_key")
    ev = sub.add_parser("evidence", help="export a device's signed batches of a round with their proofs (JSON)")
    ev.add_argument("device")
    ev.add_argument("round", type=int)
    ev.add_argument("--task", help="task id (default: every task the device sent a batch for in that round)")
    add_config_option(p, [run_cmd, provision_cmd, status_cmd, reg, ev], "TOML file (CROWDFL_EDGE__* variables override it)")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = load(args.config)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        if args.command == "provision":
            ident, created = Identity.load_or_create(cfg.key_file)
            print(json.dumps({**ident.public.to_json(), "mqtt_username": short_id(ident.node_id), "created": created}, indent=2))
        elif args.command == "register-device":
            store = EdgeStore(cfg.db_url)
            store.register_devices([(_hex32(args.node_id, "node_id"), _hex32(args.enc_key, "enc_key"))])
            store.close()
            print(f"device {args.node_id[:16]} registered")
        elif args.command == "evidence":
            print(json.dumps(evidence(cfg, _hex32(args.device, "device"), args.round, args.task), indent=2))
        elif args.command == "status":
            store = EdgeStore(cfg.db_url)
            print(json.dumps({"devices": len(store.active_devices()), **store.counts(), "rejections": store.rejection_counts()}, indent=2))
            store.close()
        else:
            return run(cfg)
    except CrowdflError as exc:
        print(f"crowdfl-edge: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
