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
from typing import TYPE_CHECKING, TextIO

import numpy as np

from crowdfl import household
from crowdfl.artifacts import fetch_artifact
from crowdfl.identity import Identity, short_id
from crowdfl.mqtt import MqttLink, MqttSettings

from .broker import EmbeddedBroker

if TYPE_CHECKING:  # the roles are imported inside the steps, so `crowdfl --help` stays fast
    from agent.service import Agent
    from coordinator.chain import ChainClient
    from coordinator.contracts import CrowdContracts
    from coordinator.service import Coordinator, HeldOut
    from coordinator.store import LocalContentStore
    from coordinator.task_model import DesignedTask
    from edge_server.service import EdgeServer

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
    t_start = time.perf_counter()
    demo = _Demo(opts, Progress(out))
    try:
        demo.progress.line(
            f"crowdfl demo: {opts.agents} agents, {opts.edges} edge servers, {opts.rounds} rounds, "
            f"epsilon {opts.epsilon:g} per sample; state in {demo.workdir}"
        )
        parts = _start_broker_and_chain(demo)
        designed, held_out = _design_task(demo)
        coord = _start_coordinator(demo, parts, held_out)
        edges = _make_edges(demo, parts, coord)
        agents = _make_agents_and_register(demo, parts, coord, edges)
        _start_roles(demo, edges, agents)
        coord.coordinator.publish_task(designed.spec, designed.front_tflite, designed.initial, reward_wei=opts.reward_wei)
        demo.progress.line(f"  task published (retained on MQTT, created on chain); initial head {designed.spec.initial_model_hash[:12]}…")
        _run_rounds(demo, coord, designed.spec.task_id, edges)
        _report_rewards(demo, parts, coord, designed.spec.task_id)
        _audit(demo, parts, coord)
        _devices_verify(demo, parts, coord, agents)
        _tally(demo, edges, agents)
        if opts.hold is not None:
            _hold(demo, coord, opts.hold)
    finally:
        demo.close()
    result = demo.result
    result.seconds = time.perf_counter() - t_start
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    demo.progress.line(
        f"done in {result.seconds:.1f}s, peak memory {result.peak_rss_mb:.0f} MB; {result.samples_released} samples released "
        f"(each once, epsilon {opts.epsilon:g}); provenance {'verified' if result.audit_ok else 'FAILED'}"
    )
    return result


# The steps of run_demo. Role modules are imported inside them, so `crowdfl --help` stays fast and
# the agent extra needs none of them.


class _Demo:
    """What every step shares: the options, the output, the result so far, and what to stop at the end."""

    def __init__(self, opts: DemoOptions, progress: Progress) -> None:
        self.opts = opts
        self.progress = progress
        self.result = DemoResult()
        self.workdir = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="crowdfl-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cleanups: list[Callable[[], None]] = []
        self.stop = threading.Event()  # the agents' run loops

    def close(self) -> None:
        self.stop.set()
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception:
                log.exception("cleanup failed")
        if not self.opts.keep_workdir and self.opts.workdir is None:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class _Parts:
    mqtt: MqttSettings
    chain: ChainClient
    contracts: CrowdContracts


@dataclass
class _CoordinatorUp:
    coordinator: Coordinator
    identity: Identity
    store: LocalContentStore
    api_url: str
    rpc_url: str

    def fetch(self, h: str) -> bytes:
        return fetch_artifact(self.api_url, h)


def _start_broker_and_chain(demo: _Demo) -> _Parts:
    from coordinator.chain import ChainConfig, connect
    from coordinator.contracts import CrowdContracts

    broker = EmbeddedBroker()
    broker.start()
    demo.cleanups.append(broker.stop)
    mqtt = MqttSettings(host=broker.host, port=broker.port)
    demo.progress.line(f"  MQTT broker (amqtt) on {broker.host}:{broker.port}")

    chain = connect(ChainConfig(kind="embedded"))
    contracts = CrowdContracts.deploy(chain)
    demo.progress.line(f"  chain (eth-tester, py-evm): contracts deployed at {', '.join(f'{k} {v[:10]}…' for k, v in contracts.addresses.items())}")
    return _Parts(mqtt, chain, contracts)


def _design_task(demo: _Demo) -> tuple[DesignedTask, HeldOut]:
    """The manufacturer's task (pretrained front, int8) and its held-out evaluation."""
    from coordinator.service import HeldOut
    from coordinator.task_model import HeldOutDesign, TaskDesign, design_task, held_out_set

    opts, progress, result = demo.opts, demo.progress, demo.result
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
    held_out = HeldOut(features, labels)
    result.initial_accuracy = held_out(list(designed.initial.weights))
    return designed, held_out


def _start_coordinator(demo: _Demo, parts: _Parts, held_out: HeldOut) -> _CoordinatorUp:
    """The coordinator with its MQTT publisher and API, and the JSON-RPC a customer's own node would answer."""
    from coordinator.api import ApiServer, create_app
    from coordinator.db import make_sessions
    from coordinator.service import Coordinator
    from coordinator.store import LocalContentStore
    from crowdfl.serving import BackgroundHttpServer

    from .rpc import rpc_app

    workdir, progress = demo.workdir, demo.progress
    coord_id = Identity.generate()
    store = LocalContentStore(workdir / "store")
    publisher = MqttLink(parts.mqtt, f"coordinator-{short_id(coord_id.node_id)}", [])
    publisher.start()
    demo.cleanups.append(publisher.stop)
    publisher.connected.wait(10)

    def publish(topic: str, payload: bytes, retain: bool) -> None:
        publisher.publish(topic, payload, qos=1, retain=retain)

    coordinator = Coordinator(
        coord_id, make_sessions(f"sqlite:///{workdir / 'coordinator.sqlite'}"), store, parts.contracts, publish, held_out,
    )
    rpc = BackgroundHttpServer(rpc_app(parts.chain.w3), name="demo-rpc")  # what a customer's own node would answer
    rpc.start()
    demo.cleanups.append(rpc.stop)
    api = ApiServer(create_app(coordinator, public_rpc_url=rpc.url))
    api.start()
    demo.cleanups.append(api.stop)
    progress.line(f"  coordinator API on {api.url}; content store in {workdir / 'store'}")
    progress.line(f"  dashboard: {api.url}/dashboard/  (customers: {api.url}/dashboard/customer)")
    if demo.opts.on_dashboard is not None:
        demo.opts.on_dashboard(f"{api.url}/dashboard/")
    return _CoordinatorUp(coordinator, coord_id, store, api.url, rpc.url)


def _make_edges(demo: _Demo, parts: _Parts, coord: _CoordinatorUp) -> list[EdgeServer]:
    from edge_server.service import EdgeServer
    from edge_server.store import EdgeStore
    from edge_server.submit import CoordinatorClient

    edges: list[EdgeServer] = []
    for i in range(demo.opts.edges):
        ident = Identity.generate()
        link = MqttLink(parts.mqtt, f"edge-{short_id(ident.node_id)}", EdgeServer.subscriptions(short_id(ident.node_id)))
        edge = EdgeServer(
            ident, coord.identity.public, EdgeStore(f"sqlite:///{demo.workdir / f'edge-{i}.sqlite'}"), link,
            CoordinatorClient(coord.api_url), coord.fetch, seed=demo.opts.seed + i,
        )
        edges.append(edge)
    return edges


def _make_agents_and_register(demo: _Demo, parts: _Parts, coord: _CoordinatorUp, edges: list[EdgeServer]) -> list[Agent]:
    """One agent per generated household, served round-robin by the edges; everyone registered on chain."""
    from agent.config import PrivacySettings
    from agent.privacy import HourCaps, PrivacyPolicy
    from agent.service import Agent
    from agent.sources import SimulatedSource
    from agent.state import AgentState
    from agent.usage_log import UsageLog

    opts, progress = demo.opts, demo.progress
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
        adir = demo.workdir / f"agent-{j:02d}"
        adir.mkdir(exist_ok=True)
        usage = UsageLog(adir / "usage.sqlite")
        profile = household.sample_profile(f"home-{j:02d}", rng)
        source = SimulatedSource(profile, HISTORY_START, 900, opts.seed * 1000 + j)
        usage.append(source.backfill(opts.history_days))
        link = MqttLink(parts.mqtt, f"agent-{short_id(ident.node_id)}", Agent.subscriptions(short_id(ident.node_id)))
        agents.append(
            Agent(
                ident, coord.identity.public, edge.identity.public, usage, AgentState(adir / "state.sqlite"), link, coord.fetch,
                adir / "models", policy, np.random.default_rng([opts.seed, j, 1]),
                resend_after_s=10.0, simulated_noise=True,  # reproducible runs; a device uses the OS CSPRNG
            )
        )
        payout = parts.chain.w3.eth.account.create().address
        payouts.append(payout)
        registry.append((ident.public, "device", edge.identity.node_id, payout))
        edge.store.register_devices([(ident.node_id, ident.public.enc_key.hex())])
    coord.coordinator.register(registry)
    progress.line(f"  registered {len(edges)} edge servers and {len(agents)} devices on chain (one registerMany transaction)")
    return agents


def _start_roles(demo: _Demo, edges: list[EdgeServer], agents: list[Agent]) -> None:
    """Edges started, every agent's run loop in a thread; returns once every MQTT link is connected."""
    for e in edges:
        e.start()
        demo.cleanups.append(e.stop)
    threads = []
    for a in agents:
        t = threading.Thread(target=a.run, args=(demo.stop,), name=f"agent-{a.short[:6]}", daemon=True)
        t.start()
        threads.append(t)

    def _join_agents() -> None:
        demo.stop.set()
        for t in threads:
            t.join(timeout=20)

    demo.cleanups.append(_join_agents)
    for link in [a.link for a in agents] + [e.link for e in edges]:
        link.connected.wait(10)


def _run_rounds(demo: _Demo, coord: _CoordinatorUp, task_id: str, edges: list[EdgeServer]) -> None:
    """Step the coordinator until every round closed and was anchored, a line per round."""
    opts, progress, result, coordinator = demo.opts, demo.progress, demo.result, coord.coordinator
    progress.line(f"{'round':>5}  {'accuracy':>8}  {'participants':>12}  {'accepted':>8}  {'rejected':>8}  {'gas':>8}  {'block':>5}  {'time':>6}")
    t0 = time.perf_counter()
    while len(result.rounds) < opts.rounds:
        summary = coordinator.step(task_id, opts.round_timeout_s)
        if summary is None:
            rnd = coordinator.current_round(task_id)
            if rnd is not None and rnd.status == "open":
                got, want = coordinator.round_progress(task_id, rnd.round)
                trained = sum(e.stats.trained for e in edges)
                progress.status(f"  round {rnd.round}: {got}/{want} updates at the coordinator ({trained} trained at the edges so far)")
                if got == 0 and time.time() - rnd.opened_at > opts.round_timeout_s:
                    raise RuntimeError(f"round {rnd.round}: no update arrived within {opts.round_timeout_s:.0f}s")
            time.sleep(0.2)
            continue
        anchored = coordinator.rounds(task_id)[summary.round - 1]
        line = RoundLine(summary.round, summary.accuracy, summary.selected, summary.accepted, summary.rejected,
                         anchored["round_gas"], anchored["block_number"] or -1, time.perf_counter() - t0)
        t0 = time.perf_counter()
        result.rounds.append(line)
        progress.line(
            f"{line.round:>5}  {line.accuracy:>8.3f}  {line.accepted + line.rejected:>5}/{line.selected:<6}  {line.accepted:>8}  "
            f"{line.rejected:>8}  {line.gas_used:>8}  {line.block_number:>5}  {line.seconds:>5.1f}s"
        )
        result.final_model_hash = summary.model_hash


def _report_rewards(demo: _Demo, parts: _Parts, coord: _CoordinatorUp, task_id: str) -> None:
    """The rewards as the database records them and as the contract set them aside for claims."""
    result = demo.result
    rewards = coord.coordinator.rewards(task_id)
    result.rewards_db_wei = sum(int(c["reward_wei"]) for c in rewards["customers"])
    task_key = bytes.fromhex(task_id)  # read back from the contract: what each round set aside for claims
    result.rewards_wei = sum(s.total_wei for s in (parts.contracts.settlement(task_key, r.round) for r in result.rounds) if s is not None)
    reps = [c["reputation"] for c in rewards["customers"]] or [float("nan")]
    demo.progress.line(
        f"rewards: {result.rewards_wei / 1e18:.4f} ETH of the {demo.opts.reward_wei / 1e18:g} ETH pool settled on chain for "
        f"{sum(1 for c in rewards['customers'] if int(c['reward_wei']) > 0)} customers by reputation x samples; "
        f"reputation now {min(reps):.2f}-{max(reps):.2f}"
    )


def _audit(demo: _Demo, parts: _Parts, coord: _CoordinatorUp) -> None:
    """The final model's provenance, from the chain and the content store alone."""
    from coordinator.audit import audit_model

    result = demo.result
    demo.progress.line(f"re-verifying model {result.final_model_hash[:16]}… from the chain and the content store alone:")
    report = audit_model(parts.contracts, coord.store, result.final_model_hash)
    result.audit_ok = report.ok
    result.audit_lines = report.lines()
    for ln in result.audit_lines:
        demo.progress.line("  " + ln)


def _devices_verify(demo: _Demo, parts: _Parts, coord: _CoordinatorUp, agents: list[Agent]) -> None:
    """Each device checks its own receipts and rewards against the chain, through its own RPC URL."""
    from agent.chainview import ChainView
    from agent.verify import coordinator_json, verify
    from crowdfl.receipts import open_receipt

    result = demo.result
    view = ChainView(coord.rpc_url, parts.contracts.addresses["CrowdTasks"], parts.contracts.addresses["Registry"])
    claimable = 0
    for a in agents:
        receipts = [(t, r, raw, open_receipt(raw).receipt.num_samples) for t, r, raw in a.state.receipts()]
        check = verify(receipts, a.identity.node_id, view, coordinator_json(coord.api_url))
        result.devices_verified += int(check.ok)
        claimable += sum(c.claim_wei for c in check.rounds)
        if not check.ok:
            for ln in check.lines():
                demo.progress.line(f"  device {a.short[:8]}: {ln}")
    demo.progress.line(
        f"devices' own check (crowdfl-agent verify through JSON-RPC {coord.rpc_url}): {result.devices_verified}/{len(agents)} "
        f"found every receipt in an anchored round; {claimable / 1e18:.4f} ETH claimable by proof"
    )


def _tally(demo: _Demo, edges: list[EdgeServer], agents: list[Agent]) -> None:
    """Samples released by the devices, messages the edges refused (by reason)."""
    demo.result.samples_released = sum(a.state.budget().samples_released for a in agents)
    ledgers = [a.state.hour_budget() for a in agents]
    demo.result.max_epsilon_per_hour = max((h.max_epsilon_per_hour for h in ledgers), default=0.0)
    demo.result.max_epsilon_per_day = max((h.max_epsilon_per_day for h in ledgers), default=0.0)
    caps = agents[0].policy.caps if agents else None
    demo.progress.line(
        f"privacy (the devices' own ledgers): the most any hour of any household's usage carries is epsilon "
        f"{demo.result.max_epsilon_per_hour:g} (cap {caps.per_hour if caps else 0:g}), any UTC day "
        f"{demo.result.max_epsilon_per_day:g} (cap {caps.per_day if caps else 0:g}), over every release"
    )
    rejected: dict[str, int] = {}
    for e in edges:
        for k, v in e.ingestor.stats.rejected.items():
            rejected[k] = rejected.get(k, 0) + v
    demo.result.messages_rejected = rejected


def _hold(demo: _Demo, coord: _CoordinatorUp, hold: threading.Event) -> None:
    demo.progress.line(f"the dashboard stays up at {coord.api_url}/dashboard/ until you stop it (Ctrl-C)")
    try:
        while not hold.wait(0.5):
            pass
    except KeyboardInterrupt:
        demo.progress.line("stopping")
