"""``crowdfl-edge``: provision, register devices, broker-config, run, status."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from crowdfl.artifacts import fetch_artifact
from crowdfl.errors import CrowdflError
from crowdfl.identity import Identity, PublicIdentity, short_id
from crowdfl.messages import is_hex64
from crowdfl.mqtt import MqttLink
from crowdfl.runtime import add_config_option, setup_logging, stop_on_signals

from .api import HttpServer, create_app
from .config import EdgeConfig, load
from .service import EdgeServer
from .store import EdgeStore
from .submit import CoordinatorClient

log = logging.getLogger("crowdfl.edge")


def _hex32(value: str, what: str) -> str:
    if not is_hex64(value.lower()):
        raise CrowdflError("bad_key", f"{what} must be 64 hex characters")
    return value.lower()


def run(cfg: EdgeConfig) -> int:
    ident, _ = Identity.load_or_create(cfg.key_file)
    try:
        coordinator = PublicIdentity.from_hex(cfg.coordinator.sign_key, cfg.coordinator.enc_key or "00" * 32)
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
            http = HttpServer(create_app(server), cfg.http.host, cfg.http.port, cfg.http.limits)
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


def broker_config(cfg: EdgeConfig, args: argparse.Namespace) -> dict[str, object]:
    """Write mosquitto.conf, acl, passwd and one password file per account into ``args.out``."""
    from .broker_config import BrokerPlan, Listener, load_or_create_passwords, write_broker_files

    if not cfg.key_file.exists():
        raise CrowdflError("not_provisioned", f"no edge identity at {cfg.key_file}: run `crowdfl-edge provision` first")
    edge = short_id(Identity.load(cfg.key_file).node_id)
    store = EdgeStore(cfg.db_url)
    try:
        devices = tuple(sorted(short_id(n) for n in store.active_devices()))
    finally:
        store.close()
    coordinators = (short_id(_hex32(cfg.coordinator.sign_key, "coordinator.sign_key")),) if cfg.coordinator.sign_key else ()
    out = Path(args.out).resolve()
    listeners = [Listener(args.port, args.bind)]
    if args.mtls_port:
        listeners.append(Listener(args.mtls_port, args.bind, client_certificates=True))
    plan = BrokerPlan(
        cafile=Path(args.cafile), certfile=Path(args.certfile), keyfile=Path(args.keyfile),
        password_file=out / "passwd", acl_file=out / "acl", listeners=tuple(listeners),
        devices=devices, edges=(edge,), coordinators=coordinators,
        message_size_limit=args.message_size_limit,
        persistence_dir=Path(args.persistence_dir) if args.persistence_dir else None,
        run_as=args.run_as or None,
    )
    passwords = load_or_create_passwords(out / "credentials", [*devices, edge, *coordinators])
    write_broker_files(plan, passwords, out / "mosquitto.conf")
    return {"config": str(out / "mosquitto.conf"), "edge": edge, "devices": list(devices),
            "coordinators": list(coordinators), "credentials": str(out / "credentials")}


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
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level (default: INFO)")
    sub = p.add_subparsers(dest="command", required=True)
    run_cmd = sub.add_parser("run", help="ingest features, train, submit (as the systemd service does)")
    provision_cmd = sub.add_parser("provision", help="generate the keys and print what the manufacturer registers")
    status_cmd = sub.add_parser("status", help="what is stored and what was rejected, by reason")
    reg = sub.add_parser("register-device", help="accept feature batches from a device")
    reg.add_argument("node_id", help="the device's node id: its Ed25519 public key, 64 hex characters")
    reg.add_argument("enc_key", help="the device's X25519 public key, 64 hex characters")
    bc = sub.add_parser("broker-config", help="write the mosquitto configuration for this edge's registered devices")
    bc.add_argument("--out", required=True, help="folder for mosquitto.conf, acl, passwd and credentials/<user>.password")
    bc.add_argument("--port", type=int, default=8883, help="TLS listener with user name + password (default 8883)")
    bc.add_argument("--mtls-port", type=int, default=8884, help="TLS listener with client certificates, CN = user name (default 8884; 0: none)")
    bc.add_argument("--bind", default="", help="address to listen on (default: every interface)")
    bc.add_argument("--cafile", default="/etc/mosquitto/certs/ca.crt", help="CA of the server and client certificates (default /etc/mosquitto/certs/ca.crt)")
    bc.add_argument("--certfile", default="/etc/mosquitto/certs/server.crt", help="the broker's TLS certificate (default /etc/mosquitto/certs/server.crt)")
    bc.add_argument("--keyfile", default="/etc/mosquitto/certs/server.key", help="the broker's TLS key (default /etc/mosquitto/certs/server.key)")
    bc.add_argument("--message-size-limit", type=int, default=1024 * 1024, help="largest PUBLISH payload in bytes (default 1048576)")
    bc.add_argument("--persistence-dir", default="/var/lib/mosquitto", help="retained messages and sessions (default /var/lib/mosquitto; '' for none)")
    bc.add_argument("--run-as", default="mosquitto", help="user mosquitto drops to when started as root (it must read passwd and acl)")
    ev = sub.add_parser("evidence", help="export a device's batches of a round with their proofs under its signed receipt (JSON)")
    ev.add_argument("device", help="the device's node id, 64 hex characters")
    ev.add_argument("round", type=int, help="the round number")
    ev.add_argument("--task", help="task id (default: every task the device sent a batch for in that round)")
    add_config_option(p, [run_cmd, provision_cmd, status_cmd, reg, bc, ev], "TOML file (CROWDFL_EDGE__* variables override it)")
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
        elif args.command == "broker-config":
            print(json.dumps(broker_config(cfg, args), indent=2))
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
