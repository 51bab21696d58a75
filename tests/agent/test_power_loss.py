"""Power loss and service stop, with the agent as its own process (``python -m agent.cli run``).

The agent is killed with SIGKILL while the edge is unreachable right after a release, and again
at a random moment right after a round opens (mid-release or mid-publish); each time it is
restarted. At the end every released sample is at the edge exactly once, the envelopes the edge
stored are byte for byte the ones spooled before the kill, no sample and no round was released
twice, and the spool is empty. A SIGTERM (systemd's stop) ends the agent with exit code 0, the
spool acknowledged or kept, the databases closed, and live plug telemetry stored.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crowdfl.identity import Identity, short_id
from crowdfl.mqtt import MqttLink, MqttSettings
from crowdfl_sim.broker import EmbeddedBroker
from tests.agent.conftest import HISTORY_START
from tests.agent.process import AgentProcess, read_ledger, write_jsonl
from tests.agent.world import EdgeCounts, World, edge_counts, household_reports, wait_for

pytestmark = pytest.mark.slow

WAIT = 60.0


@pytest.fixture
def amqtt_world(tmp_path: Path, designed_task) -> Iterator[tuple[World, Identity, MqttSettings, Path]]:  # type: ignore[no-untyped-def]
    broker = EmbeddedBroker()
    broker.start()
    mqtt = MqttSettings(host=broker.host, port=broker.port, reconnect_min_s=1, reconnect_max_s=2)
    state_dir = tmp_path / "agent"
    device, _ = Identity.load_or_create(state_dir / "identity.json")
    world: World | None = None
    try:
        world = World(tmp_path, designed_task, lambda role, short: mqtt, [device])
        yield world, device, mqtt, state_dir
    finally:
        if world is not None:
            world.close()
        broker.stop()


def _agent(world: World, mqtt: MqttSettings, state_dir: Path, tmp: Path, extra: str = "") -> AgentProcess:
    cfg = tmp / "agent.toml"
    cfg.write_text(world.agent_toml(state_dir, mqtt, extra))
    agent = AgentProcess(cfg, tmp / "agent.log")
    jsonl = write_jsonl(tmp / "history.jsonl", household_reports("power-loss-home", HISTORY_START, days=4))
    done = agent.cli("import", str(jsonl))
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr
    return agent


def test_kill_9_mid_publish_then_restart_delivers_each_sample_once(amqtt_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    world, device, mqtt, state_dir = amqtt_world
    spec = world.spec
    n = spec.samples_per_round
    state_db = state_dir / "state.sqlite"
    agent = _agent(world, mqtt, state_dir, tmp_path)

    def edge() -> EdgeCounts:
        return edge_counts(world.edge_db, device.node_id, spec.task_id, spec.feature_dim)

    try:
        # 1. the edge is down: the agent releases round 1, publishes into the void, and loses power
        world.open_round(1)
        agent.start()
        spooled = wait_for(lambda: read_ledger(state_db).spool, WAIT, f"the round-1 release\n{agent.log()}")
        assert agent.kill9() == -9
        before = read_ledger(state_db)
        assert before.by_round(1) and len(before.by_round(1)) == n and len(spooled) == 1
        payload_digest = hashlib.sha256(spooled[0][1]).hexdigest()

        # 2. power back, edge back: the same envelope is resent, stored once, acknowledged
        world.start_edge()
        agent.start()
        wait_for(lambda: not read_ledger(state_db).spool, WAIT, f"the spool to empty after the restart\n{agent.log()}")
        got = edge()
        assert got.envelopes == [(spooled[0][0], payload_digest)]  # byte for byte what was spooled before the kill
        assert got.sample_ids == before.by_round(1)
        assert read_ledger(state_db).released == before.released  # round 1 was not contributed again
        assert "already contributed" in agent.log()

        # 3. kills at random moments right after round 2 opens (during the release or the publish)
        #    and again right after the restart (during the connect or the resend)
        world.step_until_round(2, WAIT)
        rng = random.Random(short_id(device.node_id))
        time.sleep(rng.uniform(0.0, 0.6))
        assert agent.kill9() == -9
        mid = read_ledger(state_db)
        assert len(mid.by_round(2)) in (0, n)  # the release is atomic: all of the batch or none of it
        agent.start()
        time.sleep(rng.uniform(0.5, 2.0))
        assert agent.kill9() == -9
        mid2 = read_ledger(state_db)
        assert len(mid2.by_round(2)) in (0, n)
        if mid.by_round(2):
            assert mid2.by_round(2) == mid.by_round(2)
        agent.start()
        wait_for(lambda: len(read_ledger(state_db).by_round(2)) == n and not read_ledger(state_db).spool, WAIT,
                 f"round 2 to be released and acknowledged\n{agent.log()}")
        if mid2.by_round(2):
            assert read_ledger(state_db).by_round(2) == mid2.by_round(2)  # not re-drawn after the restart

        # 4. round 3 without incident, then the service is stopped
        world.step_until_round(3, WAIT)
        wait_for(lambda: len(read_ledger(state_db).by_round(3)) == n and not read_ledger(state_db).spool, WAIT,
                 f"round 3 to be released and acknowledged\n{agent.log()}")
        assert agent.terminate(30) == 0
    finally:
        agent.stop()

    final = read_ledger(state_db)
    got = edge()
    released_ids = sorted(s for s, _, _ in final.released)
    assert len(released_ids) == len(set(released_ids)) == 3 * n  # the ledger never re-released a sample
    assert [len(final.by_round(r)) for r in (1, 2, 3)] == [n, n, n]
    assert got.samples == 3 * n and got.sample_ids == released_ids  # each released sample at the edge exactly once
    seqs = sorted({seq for _, _, seq in final.released})
    assert [seq for seq, _ in got.envelopes] == seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    assert final.spool == []


def test_sigterm_exits_0_with_spool_flushed_state_closed_and_plugs_stored(amqtt_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    world, device, mqtt, state_dir = amqtt_world
    spec = world.spec
    state_db = state_dir / "state.sqlite"
    plugs = (
        "[plug_mqtt]\n"
        f'host = "{mqtt.host}"\nport = {mqtt.port}\nreconnect_min_s = 1\nreconnect_max_s = 2\n'
        '[[plugs]]\ntopic = "fridge_plug"\nkind = "fridge"\n'
        '[[plugs]]\ntopic = "kettle"\nkind = "kettle"\nfirmware = "shelly_gen2"\n'
    )
    agent = _agent(world, mqtt, state_dir, tmp_path, plugs)
    home = MqttLink(mqtt, "home-plugs", [])
    home.start()
    try:
        # A: the edge is unreachable; SIGTERM after the release: exit 0 within the grace, nothing lost
        world.open_round(1)
        agent.start()
        wait_for(lambda: read_ledger(state_db).spool, WAIT, f"the round-1 release\n{agent.log()}")
        wait_for(lambda: agent.log().count("MQTT connected") >= 2, WAIT, "the agent's two MQTT links (crowdfl + home)")
        for i in range(3):
            home.publish("tele/fridge_plug/SENSOR", b'{"ENERGY":{"Total":%.3f,"Power":80}}' % (1.0 + i / 100), qos=1).wait_for_publish(10)
        home.publish("tele/fridge_plug/SENSOR", b'{"ENERGY":{"Total":"broken"}}', qos=1).wait_for_publish(10)
        home.publish("kettle/status/switch:0", b'{"id":0,"output":true,"apower":2000,"aenergy":{"total":1500.5}}', qos=1).wait_for_publish(10)
        rc = agent.terminate(30)
        # first (a read-only reader may create the -wal file): a clean close checkpoints and removes it
        assert not Path(f"{state_db}-wal").exists(), "state database not closed cleanly"
        log_a = agent.log()
        assert rc == 0, log_a
        assert "agent stopped cleanly" in log_a and "unacknowledged envelope(s) in the spool" in log_a
        assert len(read_ledger(state_db).spool) == 1  # kept for the next start, not dropped
        assert "skipped plug message on tele/fridge_plug/SENSOR: bad_value" in log_a
        status = agent.cli("status")
        assert status.returncode == 0, status.stderr
        st = json.loads(status.stdout)
        assert st["spool_pending"] == 1 and st["samples_released"] == spec.samples_per_round
        con = sqlite3.connect(state_dir / "usage.sqlite")
        plug_rows = con.execute(
            "SELECT device_id, energy_total_kwh FROM reports WHERE device_id NOT LIKE 'power-loss-home%' ORDER BY ts"
        ).fetchall()
        con.close()
        assert plug_rows == [("tasmota:fridge_plug", 1.0), ("tasmota:fridge_plug", 1.01), ("tasmota:fridge_plug", 1.02),
                             ("shelly_gen2:kettle", 1.5005)]

        # B: edge up; SIGTERM as soon as the agent is connected: the spool is resent and acknowledged within the grace
        world.start_edge()
        agent.start()
        wait_for(lambda: agent.log().count("MQTT connected") >= 4, WAIT, f"the restarted agent's connections\n{agent.log()}")
        assert agent.terminate(30) == 0, agent.log()
        assert not Path(f"{state_db}-wal").exists()
        ledger = read_ledger(state_db)
        assert ledger.spool == []
        got = edge_counts(world.edge_db, device.node_id, spec.task_id, spec.feature_dim)
        assert got.samples == spec.samples_per_round and [s for s, _ in got.envelopes] == sorted({q for _, _, q in ledger.released})
        assert len(got.envelopes) == 1
    finally:
        home.stop()
        agent.stop()
