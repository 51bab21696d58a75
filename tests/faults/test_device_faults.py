"""Device faults on a real agent process (``python -m agent.cli run``) behind a real mosquitto,
with the real edge server and coordinator around it (tests/agent/world.py).

* The wall clock jumps three days forward between two rounds, then five days back (two days
  before the first release), with an envelope unacknowledged across the back-jump.
* The state directory is a real 8 MiB tmpfs that fills up: once before a release, once while an
  envelope waits for its acknowledgement.

Each ends with: every released sample at the edge exactly once, under consecutive sequence
numbers; the privacy accountant charged each hour and day exactly what the released samples
spend (nothing twice, nothing lost); the agent alive, the failure logged and counted in its
metrics; the rounds completed at the coordinator with one update each.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.privacy import release_spend
from crowdfl.identity import Identity, short_id
from crowdfl.mqtt import MqttSettings
from edge_server.store import EdgeStore
from tests.agent.conftest import HISTORY_START, designed_task  # noqa: F401  (session fixture)
from tests.agent.process import AgentProcess, read_ledger, write_jsonl
from tests.agent.world import World, edge_counts, household_reports, wait_for
from tests.faults.device import FakeClock, fill_disk, free_bytes, small_tmpfs
from tests.support.mosquitto import MosquittoBroker
from tests.support.realparts import free_port

pytestmark = [pytest.mark.realpart, pytest.mark.slow]

WAIT = 90.0  # the edge trains with TensorFlow on two shared (possibly busy) cores
DAY = 86400.0


class ShimmedAgent(AgentProcess):
    """The agent process on a wall clock the test can move."""

    def __init__(self, config: Path, log_path: Path, clock: FakeClock | None = None) -> None:
        super().__init__(config, log_path)
        self.clock = clock

    def _env(self) -> dict[str, str]:
        env = super()._env()
        return self.clock.env(env) if self.clock is not None else env


def _world(broker: MosquittoBroker, workdir: Path, designed: object, device: Identity) -> World:
    def mqtt_for(role: str, short: str) -> MqttSettings:
        add = {"coordinator": broker.add_coordinator, "edge": broker.add_edge, "device": broker.add_device}[role]
        creds = add(short)
        return MqttSettings(host=broker.host, port=broker.plain_port or 0, username=short, password=creds.password,
                            reconnect_min_s=1, reconnect_max_s=2)

    return World(workdir, designed, mqtt_for, [device])


def _agent(world: World, broker: MosquittoBroker, device: Identity, state_dir: Path, tmp: Path, clock: FakeClock | None,
           metrics_port: int) -> ShimmedAgent:
    short = short_id(device.node_id)
    password_file = tmp / f"{short}.password"
    password_file.write_text(broker.add_device(short).password + "\n")
    password_file.chmod(0o600)
    text = world.agent_toml(state_dir, MqttSettings(broker.host, broker.plain_port or 0))
    text = f"retry_every_s = 1.0\nmetrics_port = {metrics_port}\n" + text.replace(
        "[mqtt]\n", f'[mqtt]\nusername = "{short}"\npassword_file = "{password_file}"\n'
    )
    cfg = tmp / "agent.toml"
    cfg.write_text(text)
    agent = ShimmedAgent(cfg, tmp / "agent.log", clock)
    jsonl = write_jsonl(tmp / "history.jsonl", household_reports(f"fault-home-{short}", HISTORY_START, days=4))
    done = agent.cli("import", str(jsonl))
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr
    return agent


def _metrics(port: int) -> dict[str, float]:
    """The agent's Prometheus metrics (unlabelled series), or {} while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _accountant(state_db: Path) -> tuple[dict[int, float], dict[int, float]]:
    con = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=10)
    try:
        hours = {int(h): float(e) for h, e in con.execute("SELECT hour, epsilon FROM hour_budget")}
        days = {int(d): float(e) for d, e in con.execute("SELECT day, epsilon FROM day_budget")}
    finally:
        con.close()
    return hours, days


def _released_at(state_db: Path) -> dict[int, float]:
    con = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=10)
    try:
        return {int(r): float(t) for r, t in con.execute("SELECT round, MIN(released_at) FROM released GROUP BY round")}
    finally:
        con.close()


def _check_exactly_once(world: World, device: Identity, state_db: Path, rounds: int) -> None:
    """Every released sample at the edge once, seqs consecutive, the accountant exact, the rounds at the coordinator."""
    spec = world.spec
    n = spec.samples_per_round
    ledger = read_ledger(state_db)
    ids = sorted(s for s, _, _ in ledger.released)
    assert len(ids) == len(set(ids)) == rounds * n, "a sample was released twice or lost"
    assert [len(ledger.by_round(r)) for r in range(1, rounds + 1)] == [n] * rounds
    assert ledger.spool == []
    got = edge_counts(world.edge_db, device.node_id, spec.task_id, spec.feature_dim)
    assert got.samples == rounds * n and got.sample_ids == ids, "the edge does not hold each released sample exactly once"
    seqs = sorted({seq for _, _, seq in ledger.released})
    assert [seq for seq, _ in got.envelopes] == seqs == list(range(seqs[0], seqs[0] + rounds))
    store = EdgeStore(f"sqlite:///{world.edge_db}")
    try:
        assert store.rejection_counts() == {}, "the edge rejected a message of the device"
    finally:
        store.close()
    hours, days = _accountant(state_db)
    want = release_spend(ids, spec)
    assert set(hours) == set(want.hours) and set(days) == set(want.days)
    assert all(abs(hours[h] - e) < 1e-9 for h, e in want.hours.items()), "an hour was charged twice or not at all"
    assert all(abs(days[d] - e) < 1e-9 for d, e in want.days.items()), "a day was charged twice or not at all"
    for r in range(1, rounds + 1):
        wait_for(lambda r=r: world.coordinator.round_progress(spec.task_id, r)[0] == 1, WAIT, f"round {r}'s update at the coordinator")


@pytest.fixture
def device_world(mosquitto_broker: MosquittoBroker, tmp_path: Path, designed_task) -> Iterator[tuple[World, Identity]]:  # type: ignore[no-untyped-def]  # noqa: F811
    device = Identity.generate()
    (tmp_path / "world").mkdir()
    world = _world(mosquitto_broker, tmp_path / "world", designed_task, device)
    try:
        world.start_edge()
        yield world, device
    finally:
        world.close()


def test_clock_jumps_forward_and_back_count_each_sample_once(device_world, mosquitto_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    world, device = device_world
    spec = world.spec
    n = spec.samples_per_round
    state_dir = tmp_path / "agent"
    state_dir.mkdir()
    device.save(state_dir / "identity.json")
    clock = FakeClock(tmp_path / "clock")
    agent = _agent(world, mosquitto_broker, device, state_dir, tmp_path, clock, free_port())
    state_db = state_dir / "state.sqlite"

    def round_done(r: int) -> bool:
        led = read_ledger(state_db)
        return len(led.by_round(r)) == n and not led.spool

    try:
        agent.start()
        wait_for(lambda: "joined task" in agent.log(), WAIT, f"the agent to join the task\n{agent.log()}")
        world.open_round(1)
        wait_for(lambda: round_done(1), WAIT, f"round 1 released and acknowledged\n{agent.log()}")

        clock.jump(+3 * DAY)  # e.g. an RTC-less board that booted with a wrong date, or a bad NTP step
        world.step_until_round(2, WAIT)
        wait_for(lambda: round_done(2), WAIT, f"round 2 released and acknowledged after the forward jump\n{agent.log()}")

        # the edge goes away with round 2's update delivered; round 3's envelope is then released
        # and resent across a jump five days back (two days before round 1 was released)
        wait_for(lambda: world.coordinator.round_progress(spec.task_id, 2)[0] == 1, WAIT, "round 2's update at the coordinator")
        world.stop_edge()
        clock.jump(-5 * DAY)
        world.step_until_round(3, WAIT)
        wait_for(lambda: len(read_ledger(state_db).by_round(3)) == n, WAIT, f"round 3 released\n{agent.log()}")
        assert len(read_ledger(state_db).spool) == 1  # not acknowledged: the edge is down
        world.start_edge()
        wait_for(lambda: round_done(3), WAIT, f"round 3's envelope resent and acknowledged\n{agent.log()}")
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()
        stats = _metrics(int(agent.config.read_text().split("metrics_port = ")[1].split()[0]))
        assert stats["crowdfl_agent_messages_rejected_total"] == 0
        assert stats["crowdfl_agent_samples_released"] == 3 * n
        assert agent.terminate(30) == 0
    finally:
        agent.stop()

    # the jumps reached the agent: its ledger stamped the releases on the moved clock
    at = _released_at(state_db)
    real_gap = at[2] - at[1]
    assert 3 * DAY - 3600 < real_gap < 3 * DAY + 3600, at
    assert at[3] < at[1] - DAY, at  # round 3 was released "before" round 1 on the device's clock
    _check_exactly_once(world, device, state_db, rounds=3)
    assert "Traceback" not in agent.log(), agent.log()


def test_disk_full_before_release_and_before_ack_loses_and_doubles_nothing(device_world, mosquitto_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    world, device = device_world
    spec = world.spec
    n = spec.samples_per_round
    metrics_port = free_port()
    with small_tmpfs(tmp_path / "agent", 8 * 1024 * 1024) as state_dir:
        device.save(state_dir / "identity.json")
        agent = _agent(world, mosquitto_broker, device, state_dir, tmp_path, None, metrics_port)
        state_db = state_dir / "state.sqlite"
        try:
            agent.start()
            wait_for(lambda: "joined task" in agent.log(), WAIT, f"the agent to join the task\n{agent.log()}")

            # 1. the disk is full when round 1 opens: nothing is released, the agent says why and lives
            filler = fill_disk(state_dir)
            assert free_bytes(state_dir) == 0
            world.open_round(1)
            wait_for(lambda: agent.proc.poll() is not None or _metrics(metrics_port).get("crowdfl_agent_storage_errors_total", 0) >= 1, WAIT,
                     f"the storage error to be counted\n{agent.log()}")
            assert "disk is full" in agent.log() or "No space left" in agent.log(), agent.log()
            assert agent.proc is not None and agent.proc.poll() is None, f"the agent died on a full disk\n{agent.log()}"
            assert read_ledger(state_db).by_round(1) == [] and read_ledger(state_db).spool == []  # atomic: nothing half-released
            # 2. space comes back: the round is retried and released once
            filler.unlink()
            wait_for(lambda: len(read_ledger(state_db).by_round(1)) == n and not read_ledger(state_db).spool, WAIT,
                     f"round 1 released and acknowledged after the disk was freed\n{agent.log()}")

            # 3. the disk fills while round 2's envelope waits for the edge's acknowledgement
            wait_for(lambda: world.coordinator.round_progress(spec.task_id, 1)[0] == 1, WAIT, "round 1's update at the coordinator")
            world.stop_edge()
            world.step_until_round(2, WAIT)
            wait_for(lambda: len(read_ledger(state_db).spool) == 1, WAIT, f"round 2 released\n{agent.log()}")
            errors_before = _metrics(metrics_port).get("crowdfl_agent_storage_errors_total", 0)
            filler = fill_disk(state_dir)
            world.start_edge()  # acknowledges; recording it needs the disk the agent no longer has
            time_limit = time.monotonic() + WAIT
            while time.monotonic() < time_limit:
                stored = edge_counts(world.edge_db, device.node_id, spec.task_id, spec.feature_dim).samples
                if stored == 2 * n and (_metrics(metrics_port).get("crowdfl_agent_storage_errors_total", 0) > errors_before
                                        or not read_ledger(state_db).spool):
                    break
                time.sleep(0.1)
            assert edge_counts(world.edge_db, device.node_id, spec.task_id, spec.feature_dim).samples == 2 * n
            assert agent.proc.poll() is None, f"the agent died on a full disk\n{agent.log()}"
            filler.unlink()
            wait_for(lambda: not read_ledger(state_db).spool, WAIT, f"the spool to empty once the disk is freed\n{agent.log()}")
            assert agent.terminate(30) == 0
        finally:
            agent.stop()
        _check_exactly_once(world, device, state_db, rounds=2)
