"""N devices through M edge servers on the real parts: the cost of a round from 10 to 10,000 devices.

For each N the bench starts a fresh Debian mosquitto (TLS, one password and ACL entry per account,
written by ``edge_server.broker_config`` as ``crowdfl-edge broker-config`` writes them), fresh
PostgreSQL databases (one for the coordinator, one per edge, in one throwaway cluster) and fresh
contracts on one EthereumJS 0.9.0 clique chain (1 s blocks); then the real ``crowdfl-coordinator
serve --new-task`` and M real ``crowdfl-edge run`` processes, configured through their TOML files.

The devices are simulated lightly: ``--sim-workers`` processes multiplex the N identities. Each
device is the agent's own :class:`agent.service.Agent` (real Ed25519/X25519 keys, its own privacy
ledger and spool in its own SQLite file, the agent's release, receipt and envelope code), built
for the moment it acts and closed after: it opens the coordinator's signed TaskSpec, takes its
edge's signed acknowledgements of the previous round, gets the round's RoundStart (signature checked
and decoded once per simulator process and timed: every device would do the same work on the same
bytes, and it grows with N), releases its batch, and the
simulator publishes what the agent's uplink handed over on the device's own TLS connection with
its own MQTT account (QoS 1, clean session: no device holds a session on the broker). Devices
share a few generated households' usage logs (read only) and draw their noise from a seeded
generator (``simulated_noise``: the exact CSPRNG sampler costs 55 ms a release on one core, see
bench/agent_front.py, which real devices pay on their own CPUs).

Per N it prints and writes (``bench/results/scale.json``): seconds per round (opened to closed,
from the coordinator's database, and to anchored), CPU-seconds per device of the system (broker,
PostgreSQL, chain, coordinator, edges, summed from /proc while the round ran) and of the device
simulator, peak RSS of each role, database and content-store growth per round, gas per round and
held-out accuracy; and plots the curve (``bench/results/scale.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import queue
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results_io import RESULTS, write_result  # noqa: E402

HOST = "127.0.0.1"
GATEWAY = "simgw"  # the simulator's own account: reads tasks and acks (every device reads its own)
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------ device simulator
@dataclass(frozen=True)
class DeviceJob:
    index: int
    sign_seed: bytes
    enc_seed: bytes
    edge_sign: str
    edge_enc: str
    password: str
    household: int


@dataclass(frozen=True)
class ShardJob:
    devices: list[DeviceJob]
    coordinator_sign: str
    coordinator_enc: str
    messages: list[tuple[str, bytes, bool]]  # the TaskSpec and RoundStart, as retained on the broker
    acks: dict[str, list[tuple[str, bytes, bool]]]  # previous round's acks per device short id
    workdir: str
    households: list[str]
    front_path: str
    ca_file: str
    port: int
    publishers: int
    seed: int


class _Handover:
    """What the agent's uplink publishes, kept for the device's own TLS connection."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.out: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any:
        self.out.append((topic, payload))

        class _Info:
            rc = 0

        return _Info()


def _publish_device(short: str, password: str, msgs: list[tuple[str, bytes]], job: ShardJob, timeout: float = 120.0) -> None:
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{short}", clean_session=True)
    c.username_pw_set(short, password)
    c.tls_set(ca_certs=job.ca_file, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
        connected.set()

    c.on_connect = on_connect
    c.connect(HOST, job.port, keepalive=60)
    c.loop_start()
    try:
        if not connected.wait(timeout) or refused:
            raise RuntimeError(f"device {short}: connect {'refused: ' + refused[0] if refused else 'timed out'}")
        infos = [c.publish(t, p, qos=1) for t, p in msgs]
        for info in infos:
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise RuntimeError(f"device {short}: no PUBACK within {timeout:.0f} s")
    finally:
        c.disconnect()
        c.loop_stop()


def run_shard(job: ShardJob) -> dict[str, Any]:
    """One simulator process: every device of the shard takes its acks, opens the task and the
    round, releases (the agent's code), and publishes over its own TLS connection."""
    import numpy as np

    from agent.privacy import PrivacyPolicy
    from agent.service import Agent
    from agent.state import AgentState
    from agent.usage_log import UsageLog
    from crowdfl.identity import Identity, PublicIdentity, short_id
    from crowdfl.mqtt import Incoming

    from crowdfl.envelope import open_envelope
    from crowdfl.messages import CODEC, RoundStart

    logging.getLogger("agent").setLevel(logging.ERROR)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    coordinator = PublicIdentity.from_hex(job.coordinator_sign, job.coordinator_enc)
    # Every device checks the coordinator's signature on the same RoundStart and decodes the same
    # bytes: done once per simulator process and timed (it grows with N: the RoundStart lists every
    # selected device), then handed to each device's agent as its own check would.
    task_msg, (round_topic_, round_payload, _) = job.messages
    c0 = time.process_time()
    opened = open_envelope(round_payload, lookup_sender=lambda s: coordinator if s == coordinator.node_id else None)
    round_start = CODEC.decode(opened.body, RoundStart)
    round_check_s = time.process_time() - c0
    front = Path(job.front_path).read_bytes()
    model_dir = Path(job.workdir) / "models"
    work: queue.Queue[tuple[str, str, list[tuple[str, bytes]]] | None] = queue.Queue(maxsize=256)
    errors: list[str] = []
    published = [0]

    def publisher() -> None:
        while True:
            item = work.get()
            if item is None:
                return
            try:
                _publish_device(item[0], item[1], item[2], job)
                published[0] += len(item[2])
            except Exception as exc:  # noqa: BLE001 - counted and reported, the round shows the loss
                errors.append(str(exc))

    threads = [threading.Thread(target=publisher, daemon=True) for _ in range(job.publishers)]
    for t in threads:
        t.start()
    released = acked = 0
    contribute_s = 0.0
    for d in job.devices:
        ident = Identity(d.sign_seed, d.enc_seed)
        short = short_id(ident.node_id)
        handover = _Handover()
        c0 = time.perf_counter()
        agent = Agent(
            ident, coordinator, PublicIdentity.from_hex(d.edge_sign, d.edge_enc),
            UsageLog(job.households[d.household]), AgentState(Path(job.workdir) / "devices" / f"{d.index}.sqlite"),
            handover, lambda h: front, model_dir, PrivacyPolicy(max_epsilon=8.0),  # type: ignore[arg-type]
            np.random.default_rng([job.seed, d.index]), simulated_noise=True,
        )
        try:
            for topic, payload, retain in job.acks.get(short, []):
                agent.handle(Incoming(topic, payload, retain))
            acked += len(job.acks.get(short, []))
            agent.handle(Incoming(*task_msg))
            agent._on_round(round_start)  # what agent.handle does with the RoundStart once it checked it
            released += agent.stats.contributions
        finally:
            agent.state.close()
            agent.usage_log.close()
        contribute_s += time.perf_counter() - c0
        if handover.out:
            work.put((short, d.password, handover.out))
    for _ in threads:
        work.put(None)
    for t in threads:
        t.join()
    return {
        "devices": len(job.devices), "released": released, "published": published[0], "acks_taken": acked,
        "errors": errors[:5], "error_count": len(errors), "cpu_s": time.process_time() - cpu0,
        "wall_s": time.perf_counter() - t0, "agent_wall_s": contribute_s, "round_start_check_s": round_check_s,
    }


# ------------------------------------------------------------------------------ processes and /proc
ROLES = ("broker", "postgres", "chain", "coordinator", "edges")


def _proc_tree(pid: int) -> list[Any]:
    import psutil

    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class RoleWatch:
    """CPU seconds and RSS of every role's processes, read from /proc (psutil)."""

    def __init__(self) -> None:
        self.pids: dict[str, list[int]] = {r: [] for r in ROLES}
        self.peak_rss_mb: dict[str, float] = {}
        self.peak_edge_rss_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def processes(self, role: str) -> list[Any]:
        out = []
        for pid in self.pids[role]:
            out += _proc_tree(pid)
        return out

    def cpu(self) -> dict[str, float]:
        import psutil

        totals: dict[str, float] = {}
        for role in ROLES:
            s = 0.0
            for p in self.processes(role):
                try:
                    t = p.cpu_times()
                    s += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            totals[role] = s
        return totals

    def sample(self) -> None:
        import psutil

        for role in ROLES:
            total = 0.0
            for pid in self.pids[role]:
                tree = 0.0
                for p in _proc_tree(pid):
                    try:
                        tree += p.memory_info().rss / 2**20
                    except psutil.NoSuchProcess:
                        pass
                if role == "edges":
                    self.peak_edge_rss_mb = max(self.peak_edge_rss_mb, tree)
                total += tree
            self.peak_rss_mb[role] = max(self.peak_rss_mb.get(role, 0.0), total)

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(0.5):
                self.sample()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.sample()


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    """SIGTERM every process at once (the roles stop cleanly in parallel), then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def write_toml(path: Path, top: dict[str, Any], tables: dict[str, dict[str, Any]]) -> Path:
    lines = [f"{k} = {_toml(v)}" for k, v in top.items()]
    for name, table in tables.items():
        lines += ["", f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def _get_json(url: str, timeout: float = 30.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _wait(pred: Any, timeout: float, what: str, procs: list[subprocess.Popen[bytes]] = (), interval: float = 0.2) -> Any:  # type: ignore[assignment]
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a process exited with {p.returncode} ({' '.join(map(str, p.args))[:120]})")
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# ------------------------------------------------------------------------------ one size
@dataclass
class Shared:
    """Parts that outlive one size: the PostgreSQL cluster, the chain, the broker's PKI."""

    pg: Any
    chain: Any
    pki: Any
    tools: Any
    work: Path
    task: Any  # the DesignedTask every size publishes
    watch_pids: dict[str, list[int]] = field(default_factory=dict)


def _pg_size(pg: Any, database: str) -> int:
    import psycopg

    with psycopg.connect(host=pg.host, port=pg.port, user=pg.user, password=pg.password, dbname=database) as conn:
        return int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])  # type: ignore[index]


def run_size(n: int, m: int, rounds: int, args: argparse.Namespace, shared: Shared) -> dict[str, Any]:
    import numpy as np

    from agent.sources import SimulatedSource
    from agent.usage_log import UsageLog
    from coordinator.cli import _contracts
    from coordinator.config import load as load_coordinator_config
    from coordinator.db import make_sessions
    from coordinator.service import Coordinator
    from coordinator.store import LocalContentStore
    from crowdfl import household
    from crowdfl.envelope import open_envelope
    from crowdfl.identity import Identity, short_id
    from crowdfl.messages import CODEC, RoundStart, TaskSpec
    from crowdfl.mqtt import MqttLink, MqttSettings
    from edge_server.broker_config import BrokerPlan, ExtraAccount, Listener, write_broker_files
    from edge_server.store import EdgeStore
    from tests.support.realparts import free_ports, wait_for_ports

    base = shared.work / f"n{n}"
    base.mkdir(parents=True)
    procs: list[subprocess.Popen[bytes]] = []
    gateway: MqttLink | None = None
    watch = RoleWatch()
    watch.pids.update({k: list(v) for k, v in shared.watch_pids.items()})
    t_setup = time.perf_counter()
    try:
        # identities: the coordinator and edges keep theirs in their state folders, as provisioned
        coord_dir, edge_dirs = base / "coordinator", [base / f"edge{i}" for i in range(m)]
        coord_id, _ = Identity.load_or_create(coord_dir / "identity.json")
        edges = [Identity.load_or_create(d / "identity.json")[0] for d in edge_dirs]
        devices = [Identity.generate() for _ in range(n)]
        edge_of = [j % m for j in range(n)]

        # databases
        coord_db = shared.pg.create_database(f"coord_n{n}")
        edge_dbs = [shared.pg.create_database(f"edge_n{n}_{i}") for i in range(m)]

        # broker: the files crowdfl-edge broker-config writes, for every account at once
        mq = base / "mosquitto"
        mq.mkdir()
        (tls_port,) = free_ports(1)
        passwords = {short_id(d.node_id): secrets.token_urlsafe(12) for d in devices}
        passwords.update({short_id(e.node_id): secrets.token_urlsafe(12) for e in edges})
        passwords[short_id(coord_id.node_id)] = secrets.token_urlsafe(12)
        passwords[GATEWAY] = secrets.token_urlsafe(12)
        plan = BrokerPlan(
            cafile=shared.pki.ca_cert, certfile=shared.pki.folder / "server.crt", keyfile=shared.pki.folder / "server.key",
            password_file=mq / "passwd", acl_file=mq / "acl", listeners=(Listener(tls_port, HOST),),
            devices=tuple(short_id(d.node_id) for d in devices), edges=tuple(short_id(e.node_id) for e in edges),
            coordinators=(short_id(coord_id.node_id),),
            extra=(ExtraAccount(GATEWAY, read=("crowdfl/v1/tasks/#", "crowdfl/v1/ack/#")),),
            persistence_dir=None, run_as="root" if os.geteuid() == 0 else None, log_dest="stderr",
            max_queued_messages=1_000_000, message_size_limit=4 * 1024 * 1024,
        )
        write_broker_files(plan, passwords, mq / "mosquitto.conf")
        with (mq / "mosquitto.log").open("wb") as log:
            broker = subprocess.Popen([shared.tools.mosquitto, "-c", str(mq / "mosquitto.conf")], stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT, cwd=mq)
        procs.append(broker)
        wait_for_ports(HOST, [tls_port], 30, broker)
        watch.pids["broker"] = [broker.pid]

        def mqtt_table(user: str) -> dict[str, Any]:
            return {"host": HOST, "port": tls_port, "tls": True, "ca_file": str(shared.pki.ca_cert), "username": user,
                    "password": passwords[user]}

        # coordinator: config, contracts, registration (the library `crowdfl-coordinator register` calls)
        api_port = free_ports(1)[0]
        key_file = base / "chain.key"
        key_file.write_text(shared.chain.private_key.removeprefix("0x"))
        key_file.chmod(0o600)
        admin_token = secrets.token_hex(16)
        coord_cfg_path = write_toml(base / "coordinator.toml", {
            "state_dir": str(coord_dir), "database_url": coord_db, "api_host": HOST, "api_port": api_port,
            "round_timeout_s": float(args.round_timeout), "admin_token": admin_token,
        }, {
            "mqtt": mqtt_table(short_id(coord_id.node_id)),
            "chain": {"kind": "rpc", "rpc_url": shared.chain.rpc_url, "private_key_file": str(key_file),
                      "chain_id": shared.chain.chain_id, "confirmations": 1, "gas_price_wei": 10**9, "poa": True},
        })
        cfg = load_coordinator_config(coord_cfg_path)
        contracts = _contracts(cfg)
        reg = Coordinator(coord_id, make_sessions(coord_db), LocalContentStore(coord_dir / "store"), contracts, lambda *a: None)
        reg.registry.registry_batch = args.registry_batch
        rng = np.random.default_rng(args.seed)
        t_reg = time.perf_counter()
        reg.register([(e.public, "edge", None, None) for e in edges])
        reg.register([
            (d.public, "device", edges[edge_of[j]].node_id, "0x" + rng.bytes(20).hex()) for j, d in enumerate(devices)
        ])
        reg_s = time.perf_counter() - t_reg
        print(f"  N={n}: {n} devices and {m} edges registered (database and chain, {args.registry_batch} a transaction) in {reg_s:.1f} s", flush=True)

        # edges: their devices in their own database (what `crowdfl-edge register-device` writes)
        for i, e in enumerate(edges):
            store = EdgeStore(edge_dbs[i])
            store.register_devices([(d.node_id, d.public.enc_key.hex()) for j, d in enumerate(devices) if edge_of[j] == i])
            store.close()

        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
        env.pop("CROWDFL_CONFIG", None)
        clog = (base / "coordinator.log").open("wb")
        coordinator = subprocess.Popen(
            [*_launcher(args, base, "coordinator"), "serve", "--config", str(coord_cfg_path)], stdin=subprocess.DEVNULL, stdout=clog, stderr=subprocess.STDOUT, env=env, cwd=base,
        )
        procs.append(coordinator)
        watch.pids["coordinator"] = [coordinator.pid]
        for i, e in enumerate(edges):
            edge_cfg = write_toml(base / f"edge{i}.toml", {
                "state_dir": str(edge_dirs[i]), "database_url": edge_dbs[i], "seed": i,
            }, {
                "mqtt": mqtt_table(short_id(e.node_id)),
                "coordinator": {"url": f"http://{HOST}:{api_port}", "sign_key": coord_id.node_id, "enc_key": coord_id.public.enc_key.hex()},
                "http": {"enabled": False},
            })
            elog = (base / f"edge{i}.log").open("wb")
            procs.append(subprocess.Popen([*_launcher(args, base, f"edge{i}"), "run", "--config", str(edge_cfg)], stdin=subprocess.DEVNULL,
                                          stdout=elog, stderr=subprocess.STDOUT, env=env, cwd=base))
            watch.pids["edges"].append(procs[-1].pid)
        watch.start()

        gateway = MqttLink(MqttSettings(**{k: v for k, v in mqtt_table(GATEWAY).items() if k != "ca_file"}, ca_file=shared.pki.ca_cert),
                           f"sim-{n}", ["crowdfl/v1/tasks/#", "crowdfl/v1/ack/#"])
        gateway.start()
        retained: dict[str, tuple[str, bytes, bool]] = {}
        acks: dict[str, list[tuple[str, bytes, bool]]] = {}

        def pump() -> None:
            while True:
                try:
                    msg = gateway.inbox.get_nowait()  # type: ignore[union-attr]
                except queue.Empty:
                    return
                if msg.topic.startswith("crowdfl/v1/ack/"):
                    acks.setdefault(msg.topic.rsplit("/", 1)[1], []).append((msg.topic, msg.payload, msg.retain))
                else:
                    retained[msg.topic] = (msg.topic, msg.payload, msg.retain)

        def round_message(r: int) -> tuple[str, bytes, bool] | None:
            pump()
            for topic, payload, retain in list(retained.values()):
                if topic.endswith("/round"):
                    rs = CODEC.decode(open_envelope(payload, lookup_sender=lambda s: coord_id.public if s == coord_id.node_id else None).body, RoundStart)
                    if rs.round == r:
                        return topic, payload, retain
            return None

        # every edge must hold its (persistent) subscription before the first device publishes
        broker_log = mq / "mosquitto.log"
        _wait(lambda: all(f" as edge-{short_id(e.node_id)} " in broker_log.read_text(errors="replace") for e in edges),
              600, "the edges' broker connections", procs)
        households = []
        for h in range(min(n, args.households)):
            path = base / "households" / f"h{h}.sqlite"
            path.parent.mkdir(exist_ok=True)
            log = UsageLog(path)
            profile = household.sample_profile(f"home-{h}", np.random.default_rng([args.seed, h]))
            log.append(SimulatedSource(profile, household.WORLD_START, 900, args.seed * 1000 + h).backfill(8 + 6 * rounds))
            log.close()
            households.append(str(path))
        # everything is ready: the manufacturer publishes the task (designed once for every size)
        # through the admin API, and the coordinator opens round 1 at once (its round timeout runs)
        _wait(lambda: _answers(f"http://{HOST}:{api_port}/api/v1/tasks"), 600, "the coordinator's API", procs)
        publish_task(f"http://{HOST}:{api_port}", admin_token, shared.task)
        def task_message() -> tuple[str, bytes, bool] | None:
            pump()
            return next((v for k, v in retained.items() if not k.endswith("/round")), None)

        task_msg = _wait(task_message, 900, "the task on the broker", procs)
        rm = _wait(lambda: round_message(1), 900, "round 1 on the broker", procs)
        spec = CODEC.decode(open_envelope(task_msg[1], lookup_sender=lambda s: coord_id.public).body, TaskSpec)
        front_path = base / "front.tflite"
        front_path.write_bytes(_fetch(f"http://{HOST}:{api_port}", spec.front_model_hash))
        (base / "models").mkdir()  # the agents' model cache, filled once (the agent checks the hash on load)
        shutil.copyfile(front_path, base / "models" / f"{spec.front_model_hash}.tflite")
        (base / "devices").mkdir()
        setup_s = time.perf_counter() - t_setup
        print(f"  N={n}: set up in {setup_s:.0f} s (task {spec.task_id[:12]}, RoundStart {len(rm[1]):,} bytes)", flush=True)

        api = f"http://{HOST}:{api_port}/api/v1/tasks/{spec.task_id}/rounds"
        db_names = [coord_db.rsplit("/", 1)[1], *(u.rsplit("/", 1)[1] for u in edge_dbs)]
        sizes0 = {"coordinator_db": _pg_size(shared.pg, db_names[0]), "edge_dbs": sum(_pg_size(shared.pg, d) for d in db_names[1:]),
                  "store": _du(coord_dir / "store")}
        per_round = []
        sim_workers = max(1, min(args.sim_workers, n // 50 or 1))
        with ProcessPoolExecutor(sim_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for r in range(1, rounds + 1):
                if r > 1:
                    rm = _wait(lambda r=r: round_message(r), 900, f"round {r} on the broker", procs)
                pump()
                cpu0, t0, t0_wall = watch.cpu(), time.perf_counter(), time.time()
                shards = [
                    ShardJob([DeviceJob(j, devices[j].sign_seed, devices[j].enc_seed, edges[edge_of[j]].node_id,
                                        edges[edge_of[j]].public.enc_key.hex(), passwords[short_id(devices[j].node_id)], j % len(households))
                              for j in range(w, n, sim_workers)],
                             coord_id.node_id, coord_id.public.enc_key.hex(), [task_msg, rm],
                             {k: v for k, v in acks.items()}, str(base), households, str(front_path), str(shared.pki.ca_cert),
                             tls_port, args.publishers, args.seed)
                    for w in range(sim_workers)
                ]
                acks.clear()
                sims = list(pool.map(run_shard, shards))
                t_sent = time.perf_counter()

                def closed(r: int = r) -> dict[str, Any] | None:
                    try:
                        rows = [x for x in _get_json(api) if x["round"] == r]
                    except OSError:  # busy closing a large round (its API waits behind the intake lock): ask again
                        return None
                    done = rows and rows[0]["status"] != "open" and rows[0]["tx_hash"] and (rows[0]["settled"] or rows[0]["settle_note"])
                    return rows[0] if done else None

                row = _wait(closed, args.round_timeout + 600, f"round {r} to close and be anchored", procs, interval=0.5)
                t_done = time.perf_counter()
                cpu1 = watch.cpu()
                pump()
                sim = {k: sum(s[k] for s in sims) for k in ("devices", "released", "published", "acks_taken", "error_count", "cpu_s")}
                sim["errors"] = [e for s in sims for e in s["errors"]][:5]
                sim["wall_s"] = max(s["wall_s"] for s in sims)
                sim["round_start_check_s"] = max(s["round_start_check_s"] for s in sims)  # per device (done once per process)
                cpu = {k: cpu1[k] - cpu0[k] for k in ROLES}
                per_round.append({
                    # round 1 opens while the bench still sets up: a round is timed from whichever
                    # comes later, its opening or the devices' start
                    "round": r, "open_to_close_s": row["closed_at"] - max(row["opened_at"], t0_wall), "to_anchored_s": t_done - t0,
                    "devices_published_s": t_sent - t0, "accuracy": row["accuracy"], "accepted": row["accepted"],
                    "rejected": row["rejected"], "selected": row["selected"], "gas": row["round_gas"], "anchor_gas": row["gas_used"],
                    "settle_gas": row["settle_gas"], "cpu_s": cpu, "system_cpu_s": sum(cpu.values()), "simulator": sim,
                })
                print(f"  N={n} round {r}: {row['accepted']}/{row['selected']} accepted, {per_round[-1]['open_to_close_s']:.1f} s to close, "
                      f"{t_done - t0:.1f} s to anchored; system CPU {sum(cpu.values()):.1f} s "
                      f"({', '.join(f'{k} {v:.1f}' for k, v in cpu.items())}), simulator {sim['cpu_s']:.1f} s; "
                      f"gas {row['round_gas']:,}; accuracy {row['accuracy']:.3f}", flush=True)
                if sim["error_count"]:
                    print(f"    simulator errors: {sim['error_count']} ({sim['errors'][:2]})", flush=True)
        sizes1 = {"coordinator_db": _pg_size(shared.pg, db_names[0]), "edge_dbs": sum(_pg_size(shared.pg, d) for d in db_names[1:]),
                  "store": _du(coord_dir / "store")}
        watch.stop()
        steady = per_round[-1]
        return {
            "devices": n, "edges": m, "rounds": rounds, "setup_s": setup_s, "registration_s": reg_s,
            "round_start_bytes": len(rm[1]), "round_start_check_ms_per_device": steady["simulator"]["round_start_check_s"] * 1000,
            "round_start_egress_bytes": len(rm[1]) * n, "per_round": per_round,
            "seconds_per_round": steady["open_to_close_s"], "seconds_to_anchored": steady["to_anchored_s"],
            "system_cpu_s_per_device": steady["system_cpu_s"] / n,
            "system_cpu_s_per_accepted_update": steady["system_cpu_s"] / max(1, steady["accepted"]),
            "coordinator_cpu_s_per_round": steady["cpu_s"]["coordinator"], "chain_cpu_s_per_round": steady["cpu_s"]["chain"],
            "edge_cpu_s_per_device": steady["cpu_s"]["edges"] / n,
            "simulator_cpu_s_per_device": steady["simulator"]["cpu_s"] / n,
            "peak_rss_mb": {**watch.peak_rss_mb, "one_edge": watch.peak_edge_rss_mb},
            "growth_bytes_per_round": {k: (sizes1[k] - sizes0[k]) / rounds for k in sizes0},
            "growth_bytes_per_device_round": {k: (sizes1[k] - sizes0[k]) / rounds / n for k in sizes0},
            "gas_per_round": steady["gas"], "accuracy": steady["accuracy"], "accepted": steady["accepted"],
        }
    finally:
        watch.stop()
        if gateway is not None:
            gateway.stop()
        stop_all(procs)


def _answers(url: str) -> bool:
    try:
        _get_json(url, timeout=5)
        return True
    except OSError:
        return False


def _post(url: str, token: str, data: bytes, content_type: str) -> Any:
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type, "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def publish_task(api: str, token: str, designed: Any, reward_wei: int = 10**18) -> str:
    """Upload the task's artifacts and publish it: ``POST /api/v1/artifacts`` then ``/api/v1/tasks``."""
    from crowdfl.messages import CODEC

    spec_hash = _post(f"{api}/api/v1/artifacts", token, CODEC.encode(designed.spec), "application/octet-stream")["address"]
    _post(f"{api}/api/v1/artifacts", token, designed.front_tflite, "application/octet-stream")
    _post(f"{api}/api/v1/artifacts", token, CODEC.encode(designed.initial), "application/octet-stream")
    body = json.dumps({"spec_hash": spec_hash, "reward_wei": str(reward_wei)}).encode()
    return str(_post(f"{api}/api/v1/tasks", token, body, "application/json")["task_id"])


def _launcher(args: argparse.Namespace, base: Path, role: str) -> list[str]:
    """A role's console script, or (``--profile``) its module under bench/stack_sampler.py."""
    script, module = ("crowdfl-coordinator", "coordinator.cli") if role == "coordinator" else ("crowdfl-edge", "edge_server.cli")
    if not args.profile:
        return [sys.executable, str(BIN / script)]
    args.profile.mkdir(parents=True, exist_ok=True)
    return [sys.executable, str(ROOT / "bench" / "stack_sampler.py"), str(args.profile / f"{base.name}-{role}.txt"), module]


def _fetch(base_url: str, sha256: str) -> bytes:
    from crowdfl.artifacts import fetch_artifact

    return fetch_artifact(base_url, sha256)


# ------------------------------------------------------------------------------ report
def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ns = [r["devices"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ns, [r["seconds_per_round"] for r in rows], "o-", label="opened → closed")
    a.plot(ns, [r["seconds_to_anchored"] for r in rows], "s--", label="devices start → anchored")
    a.set(xscale="log", yscale="log", xlabel="devices", ylabel="seconds per round", title="round time")
    a.legend()
    b.plot(ns, [r["system_cpu_s_per_device"] for r in rows], "o-", label="system (broker, PG, chain, coordinator, edges)")
    b.plot(ns, [r["edge_cpu_s_per_device"] for r in rows], "^:", label="edges only")
    b.plot(ns, [r["simulator_cpu_s_per_device"] for r in rows], "s--", label="device simulator")
    b.set(xscale="log", yscale="log", xlabel="devices", ylabel="CPU-seconds per device per round", title="cost per device")
    b.legend(fontsize=8)
    pairs = ", ".join(f"{r['devices']}/{r['edges']}" for r in rows)
    fig.suptitle(f"crowdfl on the real parts: devices/edges {pairs}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report(rows: list[dict[str, Any]], args: argparse.Namespace, sizes: list[int], edges: list[int], t_all: float,
           complete: bool) -> None:
    """Print the table, write bench/results/scale.json (``complete`` false: the sizes still to come are
    missing) and plot."""
    print()
    print(f"{'devices':>8} {'edges':>5} {'s/round':>8} {'s→anchor':>8} {'CPU s/dev':>10} {'edge s/dev':>10} {'sim s/dev':>9} "
          f"{'coord s':>8} {'chain s':>8} {'gas':>9} {'acc':>6} {'DB B/dev':>9} {'store B/dev':>11}  peak RSS MB")
    for r in rows:
        g = r["growth_bytes_per_device_round"]
        rss = r["peak_rss_mb"]
        print(f"{r['devices']:>8,} {r['edges']:>5} {r['seconds_per_round']:>8.1f} {r['seconds_to_anchored']:>8.1f} "
              f"{r['system_cpu_s_per_device']:>10.4f} {r['edge_cpu_s_per_device']:>10.4f} {r['simulator_cpu_s_per_device']:>9.4f} "
              f"{r['coordinator_cpu_s_per_round']:>8.1f} {r['chain_cpu_s_per_round']:>8.1f} {r['gas_per_round']:>9,} {r['accuracy']:>6.3f} "
              f"{(g['coordinator_db'] + g['edge_dbs']):>9.0f} {g['store']:>11.0f}  "
              + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    control = next((r for r in rows if r["devices"] == 100), rows[0])
    top = rows[-1]
    ratio = top["system_cpu_s_per_device"] / control["system_cpu_s_per_device"]
    print(f"per-device system CPU at N={top['devices']:,} vs N={control['devices']:,} (the control): {ratio:.2f}x (target <= 1)")
    figures = {
        "sizes": sizes, "edges": edges, "rounds": [r["rounds"] for r in rows], "round_timeout_s": args.round_timeout,
        "registry_batch": args.registry_batch, "sim_workers": args.sim_workers, "rows": rows,
        "per_device_cpu_ratio_top_vs_control": ratio, "control_devices": control["devices"], "total_s": time.perf_counter() - t_all,
        "complete": complete,
    }
    out = write_result("scale", figures, quick=args.quick, results_dir=args.results_dir)
    png = plot(rows, (args.results_dir or RESULTS) / ("scale.quick.png" if args.quick else "scale.png"))
    print(f"  figures: {out}" + (f"; plot: {png}" if png else " (matplotlib missing: no plot)"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,100,1000,10000", help="devices per run, comma-separated")
    p.add_argument("--edges", default="2,2,5,10", help="edge servers per run, one per size")
    p.add_argument("--rounds", default="2,2,1,1", help="rounds per run, one per size (the last one is reported; round 1 pays the "
                   "edges' warm-up, TensorFlow's import among it, and one eth_call per device)")
    p.add_argument("--round-timeout", type=float, default=600.0, help="the coordinator's round_timeout_s: a round closes then with the updates it has")
    p.add_argument("--registry-batch", type=int, default=800, help="devices per registerMany/bindEdges transaction")
    p.add_argument("--sim-workers", type=int, default=2, help="device simulator processes")
    p.add_argument("--publishers", type=int, default=4, help="TLS publishing threads per simulator process")
    p.add_argument("--households", type=int, default=24, help="generated usage logs the devices share (read only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="10 and 100 devices through 2 edges, 1 round; writes scale.quick.json")
    p.add_argument("--profile", type=Path, default=None, help="folder for stack samples of the coordinator and edges (bench/stack_sampler.py)")
    p.add_argument("--results-dir", type=Path, default=None, help="where scale.json goes (default bench/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.edges, args.rounds = "10,100", "2,2", "1,1"
    sizes = [int(x) for x in args.sizes.split(",")]
    edges = [int(x) for x in args.edges.split(",")]
    rounds = [int(x) for x in str(args.rounds).split(",")]
    if len(rounds) == 1:
        rounds *= len(sizes)
    if len(edges) != len(sizes) or len(rounds) != len(sizes):
        p.error("--edges and --rounds need one count per size")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def interrupted(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the clean-up finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)  # SIGTERM too stops every process started here
    signal.signal(signal.SIGINT, interrupted)

    from tests.support import mosquitto as mosq
    from tests.support.poa_chain import ethereumjs_missing, start_clique_chain
    from tests.support.postgres import availability, running_postgres

    tools, why = mosq.find_tools()
    missing = [w for ok, w in ((tools is not None, why), availability(), (ethereumjs_missing() is None, ethereumjs_missing() or "")) if not ok]
    if missing:
        print(f"bench/scale.py: real parts missing: {'; '.join(missing)}", file=sys.stderr)
        return 3
    print(f"crowdfl scale bench: {', '.join(f'{n} devices / {m} edges / {r} round(s)' for n, m, r in zip(sizes, edges, rounds))}; "
          f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}", flush=True)
    t_all = time.perf_counter()
    rows: list[dict[str, Any]] = []
    from coordinator.task_model import TaskDesign, design_task
    from crowdfl import household

    designed = design_task(TaskDesign(rounds=max(rounds), epsilon=4.0, seed=args.seed + 7), household.WORLD_START)
    print(f"  task designed in {time.perf_counter() - t_all:.0f} s (the manufacturer's lab; published to each size's coordinator)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="crowdfl-scale-"))
    print(f"  workdir {work} (removed at the end)", flush=True)
    try:
        with running_postgres() as pg:
            chain = start_clique_chain(work / "chain", sealers=1, period_s=1)
            try:
                pki = mosq._Pki(work / "pki", tools.openssl)  # type: ignore[union-attr]
                pki.server()
                pg_pid = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
                shared = Shared(pg, chain, pki, tools, work, designed, {"postgres": [pg_pid], "chain": [n.proc.pid for n in chain.nodes]})
                for n, m, r in zip(sizes, edges, rounds):
                    rows.append(run_size(n, m, r, args, shared))
                    if len(rows) < len(sizes):  # what is measured so far survives a later failure
                        report(rows, args, sizes, edges, t_all, complete=False)
            finally:
                chain.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, args, sizes, edges, t_all, complete=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
