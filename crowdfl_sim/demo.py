"""``crowdfl demo``: one full crowdsourcing task on one machine, on the embedded parts.

It starts the embedded MQTT broker (amqtt), the embedded chain (eth-tester + py-evm), SQLite
databases and a local content-addressed store; deploys the contracts; designs and publishes a
task; runs edge servers and agents (each with its own generated household log and keys) through
the rounds over MQTT and HTTP on 127.0.0.1; anchors every round; and ends by re-verifying the final
model's provenance from the chain and the store alone.
"""

from __future__ import annotations

import logging
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from crowdfl import household
from crowdfl.artifacts import fetch_artifact
from crowdfl.identity import Identity, short_id
from crowdfl.mqtt import MqttLink, MqttSettings

from .broker import EmbeddedBroker

log = logging.getLogger(__name__)

HISTORY_START = household.WORLD_START


@dataclass(frozen=True)
class DemoOptions:
    agents: int = 10
    edges: int = 2
    rounds: int = 3
    epsilon: float = 4.0
    # the default task releases a 24-hour window every 25 hours (no two share an hour): 42 days of
    # history hold 39 of them, 13 per round for 3 rounds
    samples_per_round: int = 13
    history_days: int = 42
    held_out_households: int = 8
    aggregation: str = "fedavg"
    seed: int = 0
    round_timeout_s: float = 180.0
    reward_wei: int = 10**18  # the task's reward pool, split per round by reputation x samples
    workdir: Path | None = None
    keep_workdir: bool = False
    # after the audit, keep the dashboard (and everything behind it) up until this is set
    hold: threading.Event | None = None
    on_dashboard: Callable[[str], None] | None = None  # called with the dashboard's URL once it is up


@dataclass
class RoundLine:
    round: int
    accuracy: float
    selected: int
    accepted: int
    rejected: int
    gas_used: int
    block_number: int
    seconds: float


@dataclass
class DemoResult:
    rounds: list[RoundLine] = field(default_factory=list)
    audit_ok: bool = False
    audit_lines: list[str] = field(default_factory=list)
    final_model_hash: str = ""
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    samples_released: int = 0
    messages_rejected: dict[str, int] = field(default_factory=dict)
    pretrain_accuracy: float = 0.0
    initial_accuracy: float = 0.0  # held-out accuracy of the freshly initialised head the task publishes
    rewards_wei: int = 0  # settled on chain (the contract's per-round settlement totals), all rounds
    rewards_db_wei: int = 0  # the same rewards as the coordinator's database records them
    devices_verified: int = 0  # agents whose `crowdfl-agent verify` passed against the chain
    max_epsilon_per_hour: float = 0.0  # the largest budget any hour of any agent's usage log carries (its ledger)
    max_epsilon_per_day: float = 0.0


class Progress:
    """One status line, rewritten in place on a terminal, printed sparsely otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last = 0.0

    def status(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K" + text)
            self.out.flush()
        elif time.monotonic() - self._last > 5.0:
            self._last = time.monotonic()
            self.out.write(text + "\n")

    def line(self, text: str) -> None:
        if self.tty:
            self.out.write("\r\033[K")
        self.out.write(text + "\n")
        self.out.flush()


def run_demo(opts: DemoOptions, out: TextIO = sys.stdout) -> DemoResult:
    # heavy imports here, so `crowdfl --help` stays fast and the agent extra needs none of them
    from agent.config import PrivacySettings
    from agent.privacy import HourCaps, PrivacyPolicy
    from agent.service import Agent
    from agent.sources import SimulatedSource
    from agent.state import AgentState
    from agent.usage_log import UsageLog
    from coordinator.api import ApiServer, create_app
    from coordinator.audit import audit_model
    from coordinator.chain import ChainConfig, connect
    from coordinator.contracts import CrowdContracts
    from coordinator.db import make_sessions
    from coordinator.service import Coordinator, HeldOut
    from coordinator.store import LocalContentStore
    from coordinator.task_model import HeldOutDesign, TaskDesign, design_task, held_out_set
    from edge_server.service import EdgeServer
    from edge_server.store import EdgeStore
    from edge_server.submit import CoordinatorClient

    t_start = time.perf_counter()
    progress = Progress(out)
    result = DemoResult()
    workdir = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="crowdfl-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cleanups: list[Callable[[], None]] = []
    stop = threading.Event()
    try:
        progress.line(f"crowdfl demo: {opts.agents} agents, {opts.edges} edge servers, {opts.rounds} rounds, epsilon {opts.epsilon:g} per sample; state in {workdir}")
        broker = EmbeddedBroker()
        broker.start()
        cleanups.append(broker.stop)
        mqtt = MqttSettings(host=broker.host, port=broker.port)
        progress.line(f"  MQTT broker (amqtt) on {broker.host}:{broker.port}")

        chain = connect(ChainConfig(kind="embedded"))
        contracts = CrowdContracts.deploy(chain)
        progress.line(f"  chain (eth-tester, py-evm): contracts deployed at {', '.join(f'{k} {v[:10]}…' for k, v in contracts.addresses.items())}")

        progress.status("  designing the task: pretraining on lab households, int8 conversion of the front layers…")
        designed = design_task(
            TaskDesign(rounds=opts.rounds, epsilon=opts.epsilon, samples_per_round=opts.samples_per_round, aggregation=opts.aggregation, seed=opts.seed + 7),
            HISTORY_START,
        )
        spec = designed.spec
        result.pretrain_accuracy = designed.pretrain_accuracy
        progress.line(
            f"  task {spec.task_id[:12]}…: front model {len(designed.front_tflite)} bytes int8 TFLite, "
            f"{spec.feature_dim} features, clip L1 {spec.clip_l1:g}, {spec.num_classes} classes"
        )
        features, labels = held_out_set(
            spec, designed.front_tflite, HeldOutDesign(opts.held_out_households, opts.seed + 10_000, opts.history_days, HISTORY_START)
        )

        result.initial_accuracy = HeldOut(features, labels)(list(designed.initial.weights))

        coord_id = Identity.generate()
        store = LocalContentStore(workdir / "store")
        publisher = MqttLink(mqtt, f"coordinator-{short_id(coord_id.node_id)}", [])
        publisher.start()
        cleanups.append(publisher.stop)
        publisher.connected.wait(10)

        def publish(topic: str, payload: bytes, retain: bool) -> None:
            publisher.publish(topic, payload, qos=1, retain=retain)

        coordinator = Coordinator(
            coord_id, make_sessions(f"sqlite:///{workdir / 'coordinator.sqlite'}"), store, contracts, publish,
            HeldOut(features, labels),
        )
        from crowdfl.serving import BackgroundHttpServer

        from .rpc import rpc_app

        rpc = BackgroundHttpServer(rpc_app(chain.w3), name="demo-rpc")  # what a customer's own node would answer
        rpc.start()
        cleanups.append(rpc.stop)
        api = ApiServer(create_app(coordinator, public_rpc_url=rpc.url))
        api.start()
        cleanups.append(api.stop)
        progress.line(f"  coordinator API on {api.url}; content store in {workdir / 'store'}")
        progress.line(f"  dashboard: {api.url}/dashboard/  (customers: {api.url}/dashboard/customer)")
        if opts.on_dashboard is not None:
            opts.on_dashboard(f"{api.url}/dashboard/")

        def fetch(h: str) -> bytes:
            return fetch_artifact(api.url, h)

        edges: list[EdgeServer] = []
        for i in range(opts.edges):
            ident = Identity.generate()
            link = MqttLink(mqtt, f"edge-{short_id(ident.node_id)}", EdgeServer.subscriptions(short_id(ident.node_id)))
            edge = EdgeServer(
                ident, coord_id.public, EdgeStore(f"sqlite:///{workdir / f'edge-{i}.sqlite'}"), link,
                CoordinatorClient(api.url), fetch, seed=opts.seed + i,
            )
            edges.append(edge)

        agents: list[Agent] = []
        registry: list[tuple] = [(e.identity.public, "edge", None, None) for e in edges]  # type: ignore[type-arg]
        payouts: list[str] = []  # the customers' payout addresses, where the contract credits rewards
        rng = np.random.default_rng(opts.seed)
        # every device keeps its owner's defaults (caps per hour and per day on), raised only when the
        # demo is asked for a larger epsilon per sample than they allow
        owner = PrivacySettings()
        caps = HourCaps(max(owner.max_epsilon_per_hour, opts.epsilon), max(owner.max_epsilon_per_day, opts.epsilon))
        policy = PrivacyPolicy(max(owner.max_epsilon, opts.epsilon), owner.require_label_privacy, caps)
        for j in range(opts.agents):
            progress.status(f"  agents: generating household {j + 1}/{opts.agents}'s usage log…")
            ident = Identity.generate()
            edge = edges[j % len(edges)]
            adir = workdir / f"agent-{j:02d}"
            adir.mkdir(exist_ok=True)
            usage = UsageLog(adir / "usage.sqlite")
            profile = household.sample_profile(f"home-{j:02d}", rng)
            source = SimulatedSource(profile, HISTORY_START, 900, opts.seed * 1000 + j)
            usage.append(source.backfill(opts.history_days))
            link = MqttLink(mqtt, f"agent-{short_id(ident.node_id)}", Agent.subscriptions(short_id(ident.node_id)))
            agents.append(
                Agent(
                    ident, coord_id.public, edge.identity.public, usage, AgentState(adir / "state.sqlite"), link, fetch,
                    adir / "models", policy, np.random.default_rng([opts.seed, j, 1]),
                    resend_after_s=10.0, simulated_noise=True,  # reproducible runs; a device uses the OS CSPRNG
                )
            )
            payout = chain.w3.eth.account.create().address
            payouts.append(payout)
            registry.append((ident.public, "device", edge.identity.node_id, payout))
            edge.store.register_devices([(ident.node_id, ident.public.enc_key.hex())])
        coordinator.register(registry)
        progress.line(f"  registered {len(edges)} edge servers and {len(agents)} devices on chain (one registerMany transaction)")

        for e in edges:
            e.start()
            cleanups.append(e.stop)
        threads = []
        for a in agents:
            t = threading.Thread(target=a.run, args=(stop,), name=f"agent-{a.short[:6]}", daemon=True)
            t.start()
            threads.append(t)

        def _join_agents() -> None:
            stop.set()
            for t in threads:
                t.join(timeout=20)

        cleanups.append(_join_agents)
        for link in [a.link for a in agents] + [e.link for e in edges]:
            link.connected.wait(10)

        coordinator.publish_task(spec, designed.front_tflite, designed.initial, reward_wei=opts.reward_wei)
        progress.line(f"  task published (retained on MQTT, created on chain); initial head {spec.initial_model_hash[:12]}…")
        progress.line(f"{'round':>5}  {'accuracy':>8}  {'participants':>12}  {'accepted':>8}  {'rejected':>8}  {'gas':>8}  {'block':>5}  {'time':>6}")

        t0 = time.perf_counter()
        while len(result.rounds) < opts.rounds:
            summary = coordinator.step(spec.task_id, opts.round_timeout_s)
            if summary is None:
                rnd = coordinator.current_round(spec.task_id)
                if rnd is not None and rnd.status == "open":
                    got, want = coordinator.round_progress(spec.task_id, rnd.round)
                    trained = sum(e.stats.trained for e in edges)
                    progress.status(f"  round {rnd.round}: {got}/{want} updates at the coordinator ({trained} trained at the edges so far)")
                    if got == 0 and time.time() - rnd.opened_at > opts.round_timeout_s:
                        raise RuntimeError(f"round {rnd.round}: no update arrived within {opts.round_timeout_s:.0f}s")
                time.sleep(0.2)
                continue
            anchored = coordinator.rounds(spec.task_id)[summary.round - 1]
            line = RoundLine(summary.round, summary.accuracy, summary.selected, summary.accepted, summary.rejected,
                             anchored["round_gas"], anchored["block_number"] or -1, time.perf_counter() - t0)
            t0 = time.perf_counter()
            result.rounds.append(line)
            progress.line(
                f"{line.round:>5}  {line.accuracy:>8.3f}  {line.accepted + line.rejected:>5}/{line.selected:<6}  {line.accepted:>8}  "
                f"{line.rejected:>8}  {line.gas_used:>8}  {line.block_number:>5}  {line.seconds:>5.1f}s"
            )
            result.final_model_hash = summary.model_hash

        rewards = coordinator.rewards(spec.task_id)
        result.rewards_db_wei = sum(int(c["reward_wei"]) for c in rewards["customers"])
        task_key = bytes.fromhex(spec.task_id)  # read back from the contract: what each round set aside for claims
        result.rewards_wei = sum(s.total_wei for s in (contracts.settlement(task_key, r.round) for r in result.rounds) if s is not None)
        reps = [c["reputation"] for c in rewards["customers"]] or [float("nan")]
        progress.line(
            f"rewards: {result.rewards_wei / 1e18:.4f} ETH of the {opts.reward_wei / 1e18:g} ETH pool settled on chain for "
            f"{sum(1 for c in rewards['customers'] if int(c['reward_wei']) > 0)} customers by reputation x samples; "
            f"reputation now {min(reps):.2f}-{max(reps):.2f}"
        )
        progress.line(f"re-verifying model {result.final_model_hash[:16]}… from the chain and the content store alone:")
        report = audit_model(contracts, store, result.final_model_hash)
        result.audit_ok = report.ok
        result.audit_lines = report.lines()
        for ln in result.audit_lines:
            progress.line("  " + ln)
        # each device checks its own receipts and rewards against the chain, through its own RPC URL
        from agent.chainview import ChainView
        from agent.verify import coordinator_json, verify
        from crowdfl.receipts import open_receipt

        view = ChainView(rpc.url, contracts.addresses["CrowdTasks"], contracts.addresses["Registry"])
        claimable = 0
        for a in agents:
            receipts = [(t, r, raw, open_receipt(raw).receipt.num_samples) for t, r, raw in a.state.receipts()]
            check = verify(receipts, a.identity.node_id, view, coordinator_json(api.url))
            result.devices_verified += int(check.ok)
            claimable += sum(c.claim_wei for c in check.rounds)
            if not check.ok:
                for ln in check.lines():
                    progress.line(f"  device {a.short[:8]}: {ln}")
        progress.line(
            f"devices' own check (crowdfl-agent verify through JSON-RPC {rpc.url}): {result.devices_verified}/{len(agents)} "
            f"found every receipt in an anchored round; {claimable / 1e18:.4f} ETH claimable by proof"
        )
        result.samples_released = sum(a.state.budget().samples_released for a in agents)
        ledgers = [a.state.hour_budget() for a in agents]
        result.max_epsilon_per_hour = max((h.max_epsilon_per_hour for h in ledgers), default=0.0)
        result.max_epsilon_per_day = max((h.max_epsilon_per_day for h in ledgers), default=0.0)
        progress.line(
            f"privacy (the devices' own ledgers): the most any hour of any household's usage carries is epsilon "
            f"{result.max_epsilon_per_hour:g} (cap {caps.per_hour:g}), any UTC day {result.max_epsilon_per_day:g} "
            f"(cap {caps.per_day:g}), over every release"
        )
        rejected: dict[str, int] = {}
        for e in edges:
            for k, v in e.ingestor.stats.rejected.items():
                rejected[k] = rejected.get(k, 0) + v
        result.messages_rejected = rejected
        if opts.hold is not None:
            progress.line(f"the dashboard stays up at {api.url}/dashboard/ until you stop it (Ctrl-C)")
            try:
                while not opts.hold.wait(0.5):
                    pass
            except KeyboardInterrupt:
                progress.line("stopping")
    finally:
        stop.set()
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception:
                log.exception("cleanup failed")
        if not opts.keep_workdir and opts.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result.seconds = time.perf_counter() - t_start
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    progress.line(
        f"done in {result.seconds:.1f}s, peak memory {result.peak_rss_mb:.0f} MB; {result.samples_released} samples released "
        f"(each once, epsilon {opts.epsilon:g}); provenance {'verified' if result.audit_ok else 'FAILED'}"
    )
    return result
