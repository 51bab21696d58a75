"""``crowdfl-agent``: provision, run, status and import on the customer's board."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from crowdfl.artifacts import fetch_artifact
from crowdfl.receipts import open_receipt
from crowdfl.errors import CrowdflError
from crowdfl.devices import DEVICE_KINDS
from crowdfl.identity import Identity, PublicIdentity, short_id
from crowdfl.mqtt import MqttLink, MqttSettings
from crowdfl.runtime import add_config_option, setup_logging, stop_on_signals

from .config import AgentConfig, load
from .privacy import HourCaps, PrivacyPolicy
from .service import Agent
from .sources import PlugMqttSource, SimulatedSource, UsageSource, read_reports_file
from .state import AgentState
from .usage_log import Retention, UsageLog

log = logging.getLogger("crowdfl.agent")


def _peer(sign_key: str, enc_key: str, what: str) -> PublicIdentity:
    try:
        return PublicIdentity.from_hex(sign_key, enc_key or "00" * 32)
    except ValueError:
        raise CrowdflError("config", f"{what}: sign_key/enc_key must be 64 hex characters each (provisioned by the manufacturer)") from None


def provision(cfg: AgentConfig) -> dict[str, str]:
    """First boot: generate the keys (0600) if absent and return what the manufacturer registers."""
    ident, created = Identity.load_or_create(cfg.key_file)
    return {
        **ident.public.to_json(),
        "mqtt_username": short_id(ident.node_id),
        "created": "yes" if created else "no (existing keys kept)",
        "key_file": str(cfg.key_file),
    }


def status(cfg: AgentConfig) -> dict[str, object]:
    state = AgentState(cfg.state_dir / "state.sqlite")
    usage = UsageLog(cfg.state_dir / "usage.sqlite")
    try:
        budget = state.budget()
        hours = state.hour_budget()
        span = usage.span()
        pending = state.pending(limit=1_000_000)
        return {
            "node_id": Identity.load(cfg.key_file).node_id if cfg.key_file.exists() else None,
            "usage_reports": usage.count(),
            "usage_span": [datetime.fromtimestamp(t, timezone.utc).isoformat() for t in span] if span else None,
            "samples_released": budget.samples_released,
            "max_epsilon_per_sample": budget.max_epsilon_per_sample,
            "budget_by_task": {k: {"samples": n, "epsilon_sum": e} for k, (n, e) in budget.by_task.items()},
            # what one hour / one UTC day of this household's usage carries over every release
            "privacy_per_hour": {
                "max_epsilon_per_hour": hours.max_epsilon_per_hour,
                "max_epsilon_per_day": hours.max_epsilon_per_day,
                "cap_per_hour": cfg.privacy.max_epsilon_per_hour or None,
                "cap_per_day": cfg.privacy.max_epsilon_per_day or None,
                "hours_accounted": hours.hours_accounted,
                "busiest_hour": datetime.fromtimestamp(hours.busiest_hour * 3600, timezone.utc).isoformat() if hours.busiest_hour is not None else None,
            },
            "spool_pending": len(pending),
            "spool_bytes": state.spool_bytes(),
        }
    finally:
        state.close()
        usage.close()


def build_agent(cfg: AgentConfig, ident: Identity) -> Agent:
    coordinator = _peer(cfg.coordinator.sign_key, cfg.coordinator.enc_key, "coordinator")
    edge = _peer(cfg.edge.sign_key, cfg.edge.enc_key, "edge")
    short = short_id(ident.node_id)
    mqtt: MqttSettings = cfg.mqtt if cfg.mqtt.username else _with_username(cfg.mqtt, short)
    link = MqttLink(mqtt, f"agent-{short}", Agent.subscriptions(short))
    agent = Agent(
        ident, coordinator, edge,
        UsageLog(cfg.state_dir / "usage.sqlite", Retention(cfg.log.retention_days, cfg.log.max_rows)),
        AgentState(cfg.state_dir / "state.sqlite", int(cfg.max_spool_mb * 1024 * 1024)),
        link, lambda h: fetch_artifact(cfg.coordinator.url, h), cfg.state_dir / "models",
        PrivacyPolicy(
            cfg.privacy.max_epsilon, cfg.privacy.require_label_privacy,
            HourCaps(cfg.privacy.max_epsilon_per_hour, cfg.privacy.max_epsilon_per_day),
        ),
        np.random.default_rng(), cfg.resend_after_s,
    )
    agent.retry_every_s = cfg.retry_every_s
    return agent


def _with_username(m: MqttSettings, user: str) -> MqttSettings:
    from dataclasses import replace

    return replace(m, username=user)


def build_sources(cfg: AgentConfig, short: str) -> list[UsageSource]:
    """The configured sensor readers: a simulated household and/or the home's smart plugs."""
    sources: list[UsageSource] = []
    if cfg.source.kind == "simulated":
        from crowdfl.household import sample_profile  # the generator only where it is configured

        profile = sample_profile(f"sim-{short}", np.random.default_rng(cfg.source.seed))
        now = time.time()
        start = datetime.fromtimestamp(now - now % cfg.source.interval_s - 28 * 86400, timezone.utc)
        sources.append(SimulatedSource(profile, start, cfg.source.interval_s, cfg.source.seed))
    # jsonl is a one-off `import`; live plug telemetry arrives through its own source
    if cfg.plugs:
        sources.append(PlugMqttSource(cfg.plug_mqtt, cfg.plugs, f"agent-plugs-{short}"))
    return sources


def drain_sources(sources: list[UsageSource], usage: UsageLog) -> int:
    """Move what every source has into the usage log; a failing source is logged and skipped."""
    stored = 0
    for src in sources:
        try:
            reports = src.poll(time.time())
            if reports:
                stored += usage.append(reports)
        except Exception:
            log.exception("usage source %s failed; retrying", type(src).__name__)
    return stored


def poll_sources(sources: list[UsageSource], usage: UsageLog, stop: threading.Event, poll_s: float, prune_every_s: float = 60.0) -> None:
    """Feed the usage log from the sources every ``poll_s`` and apply retention once a minute."""
    last_prune = 0.0
    while not stop.is_set():
        drain_sources(sources, usage)
        if time.monotonic() - last_prune > prune_every_s:
            last_prune = time.monotonic()
            try:
                usage.prune()
            except Exception:
                log.exception("usage log retention failed; retrying")
        stop.wait(poll_s)


def run(cfg: AgentConfig) -> int:
    stop = stop_on_signals()  # first, so a SIGTERM during start-up still ends in a clean stop
    ident, created = Identity.load_or_create(cfg.key_file)
    if created:
        log.info("first boot: generated keys for node %s (run `crowdfl-agent provision` to print them)", ident.node_id)
    agent = build_agent(cfg, ident)
    sources = build_sources(cfg, agent.short)
    for src in sources:
        src.open()
    feeder = threading.Thread(
        target=poll_sources, args=(sources, agent.usage_log, stop, cfg.source.poll_s), name="sources", daemon=True
    )
    feeder.start()
    metrics = None
    if cfg.metrics_port:
        from .metrics import MetricsServer

        metrics = MetricsServer(agent, port=cfg.metrics_port)
        metrics.start()

    def _stop_sources() -> None:
        stop.set()
        if metrics is not None:
            metrics.stop()
        feeder.join(timeout=10)
        for src in sources:
            try:
                src.close()
            except Exception:
                log.exception("closing usage source %s failed", type(src).__name__)
        drain_sources(sources, agent.usage_log)  # what arrived before the close is kept

    log.info(
        "agent %s running; broker %s:%d, edge %s, %d plug(s)",
        agent.short, cfg.mqtt.host, cfg.mqtt.port, agent.edge.node_id[:16], len(cfg.plugs),
    )
    # returns after draining the spool (bounded), stopping the sources and closing the databases
    agent.run(stop, cfg.shutdown_grace_s, _stop_sources)
    log.info("agent stopped cleanly")
    return 0


def verify_or_claim(cfg: AgentConfig, command: str) -> int:
    from .chainview import ChainView
    from .verify import claim, coordinator_json, verify

    if not (cfg.chain.rpc_url and cfg.chain.tasks_address and cfg.chain.registry_address):
        raise CrowdflError("config", "[chain] rpc_url, tasks_address and registry_address are needed to check the chain")
    if not cfg.coordinator.url:
        raise CrowdflError("config", "coordinator.url is needed to fetch the Merkle proofs")
    ident = Identity.load(cfg.key_file)
    state = AgentState(cfg.state_dir / "state.sqlite")
    try:
        receipts = [(t, r, raw, open_receipt(raw).receipt.num_samples) for t, r, raw in state.receipts()]
    finally:
        state.close()
    chain = ChainView(cfg.chain.rpc_url, cfg.chain.tasks_address, cfg.chain.registry_address)
    fetch = coordinator_json(cfg.coordinator.url)
    if command == "claim":
        for line in claim(receipts, ident.node_id, chain, fetch):
            print(line)
        return 0
    report = verify(receipts, ident.node_id, chain, fetch)
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crowdfl-agent", description="The crowdfl device agent.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level (default: INFO)")
    sub = p.add_subparsers(dest="command", required=True)
    run_cmd = sub.add_parser("run", help="run the agent (as the systemd service does)")
    status_cmd = sub.add_parser("status", help="usage log, privacy budget spent, spool")
    provision_cmd = sub.add_parser("provision", help="generate the keys on first boot and print what the manufacturer registers")
    imp = sub.add_parser("import", help="import usage reports from a CSV (.csv) or JSON-lines file")
    imp.add_argument("file", type=Path, help="usage reports: .csv (device_id,kind,ts,power_w,energy_total_kwh,on) or .jsonl, one report per line")
    verify_cmd = sub.add_parser("verify", help="check through [chain] rpc_url that every receipt is anchored, and what can be claimed")
    claim_cmd = sub.add_parser("claim", help="claim every verified, unclaimed reward (paid to the registered payout)")
    add_config_option(p, [run_cmd, status_cmd, provision_cmd, imp, verify_cmd, claim_cmd], "TOML file (CROWDFL_AGENT__* variables override it)")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    try:
        cfg = load(args.config)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        if args.command == "provision":
            print(json.dumps(provision(cfg), indent=2))
        elif args.command == "status":
            print(json.dumps(status(cfg), indent=2))
        elif args.command in ("verify", "claim"):
            return verify_or_claim(cfg, args.command)
        elif args.command == "import":
            usage = UsageLog(cfg.state_dir / "usage.sqlite")
            try:
                n = usage.append(read_reports_file(args.file, DEVICE_KINDS))
            finally:
                usage.close()
            print(f"imported {n} new reports from {args.file}")
        else:
            return run(cfg)
    except (CrowdflError, OSError) as exc:
        print(f"crowdfl-agent: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
