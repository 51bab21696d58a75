"""The agent against the real Debian mosquitto: TLS, per-device username/password, ACLs.

(a) a release travels agent -> broker -> real edge server, which stores and acknowledges it, and the
    spool empties (then the edge trains and the real coordinator receives the update);
(b) the ACL keeps a device to its own feature topic: a publish under another device's topic never
    reaches the edge, and a device cannot read another device's acknowledgements;
(c) smart-plug telemetry on the home's broker: corrupt and unexpected messages are logged and
    skipped, the good ones around them are stored.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.cli import build_agent
from agent.config import AgentConfig, PlugSettings, load
from agent.sources import PlugMqttSource
from agent.usage_log import UsageLog
from crowdfl.envelope import seal
from crowdfl.identity import Identity, short_id
from crowdfl.messages import CODEC, FeatureBatch
from crowdfl.mqtt import MqttLink, MqttSettings, ack_topic, feature_topic
from tests.agent.conftest import HISTORY_START
from tests.agent.process import read_ledger
from tests.agent.world import World, edge_counts, household_reports, wait_for
from tests.helpers import with_receipt
from tests.support.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.realpart, pytest.mark.slow]

WAIT = 60.0  # bound for anything that must happen (the edge trains with TensorFlow on 2 shared cores)
SILENCE = 1.0  # extra wait before asserting that something did NOT arrive


def tls_settings(broker: MosquittoBroker, username: str, password: str) -> MqttSettings:
    return MqttSettings(
        host=broker.host, port=broker.tls_port, tls=True, ca_file=broker.ca_path, username=username,
        password=password, reconnect_min_s=1, reconnect_max_s=2,
    )


class TlsWorld:
    """A World whose roles each log in to mosquitto with their own account over TLS."""

    def __init__(self, broker: MosquittoBroker, workdir: Path, designed: object, devices: list[Identity]) -> None:
        self.broker = broker

        def mqtt_for(role: str, short: str) -> MqttSettings:
            add = {"coordinator": broker.add_coordinator, "edge": broker.add_edge, "device": broker.add_device}[role]
            return tls_settings(broker, short, add(short).password)

        self.mqtt_for = mqtt_for
        self.world = World(workdir, designed, mqtt_for, devices)


@pytest.fixture(scope="module")
def tls_world(mosquitto_broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory, designed_task) -> Iterator[tuple[TlsWorld, Identity]]:  # type: ignore[no-untyped-def]
    workdir = tmp_path_factory.mktemp("tls-world")
    device, _ = Identity.load_or_create(workdir / "agent" / "identity.json")
    tw = TlsWorld(mosquitto_broker, workdir, designed_task, [device])
    tw.world.start_edge()
    try:
        yield tw, device
    finally:
        tw.world.close()


def test_release_is_ingested_and_acknowledged_over_tls(tls_world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tw, device = tls_world
    world, broker = tw.world, tw.broker
    state_dir = world.workdir / "agent"
    short = short_id(device.node_id)
    password_file = state_dir / "mqtt.password"
    password_file.write_text(broker.add_device(short).password + "\n")
    password_file.chmod(0o600)
    toml = tmp_path / "agent.toml"
    toml.write_text(world.agent_toml(state_dir, MqttSettings(broker.host, broker.tls_port)))
    cfg = load(toml)
    cfg = replace(cfg, mqtt=replace(cfg.mqtt, tls=True, ca_file=broker.ca_path, username=short, password_file=password_file))
    agent = build_agent(cfg, Identity.load(cfg.key_file))
    assert agent.link.settings.tls and agent.link.settings.username == short
    agent.usage_log.append(household_reports("tls-home", HISTORY_START, days=4))
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop, 5.0), daemon=True)
    thread.start()
    try:
        wait_for(lambda: world.spec.task_id in agent.tasks, WAIT, "the agent to join the retained task over TLS")
        world.open_round(1)
        n = world.spec.samples_per_round
        wait_for(lambda: agent.state.budget().samples_released == n, WAIT, "the release")
        wait_for(lambda: not agent.state.pending(), WAIT, "the edge's acknowledgement (spool empty)")
        counts = edge_counts(world.edge_db, device.node_id, world.spec.task_id, world.spec.feature_dim)
        assert counts.samples == n and len(counts.envelopes) == 1
        released_seqs = {seq for _, _, seq in read_ledger(Path(agent.state.path)).released}
        assert [counts.envelopes[0][0]] == sorted(released_seqs)  # the one seq, stored once
        # and the rest of the path: the edge trained on it and the real coordinator has the update
        wait_for(lambda: world.coordinator.round_progress(world.spec.task_id, 1)[0] == 1, WAIT, "the update at the coordinator")
        assert agent.stats.rejected_messages == 0
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()


def test_acl_confines_a_device_to_its_own_topics(tls_world) -> None:  # type: ignore[no-untyped-def]
    tw, victim = tls_world
    world, broker = tw.world, tw.broker
    edge = world.edge
    assert edge is not None
    attacker = Identity.generate()
    a_short, v_short, e_short = short_id(attacker.node_id), short_id(victim.node_id), short_id(world.edge_id.node_id)
    edge.store.register_devices([(attacker.node_id, attacker.public.enc_key.hex())])  # a registered, honest-looking device
    link = MqttLink(tw.mqtt_for("device", a_short), f"agent-{a_short}", [ack_topic("+", v_short), ack_topic("+", a_short)])
    link.start()
    try:
        wait_for(link.connected.is_set, WAIT, "the attacker's MQTT connection")
        rejected_before = dict(edge.ingestor.stats.rejected)
        accepted_before = edge.ingestor.stats.accepted
        spec = world.spec

        def batch(ids: list[int]) -> bytes:
            k = len(ids)
            fb = FeatureBatch(spec.task_id, 1, np.array(ids, np.uint64), np.full((k, spec.feature_dim), 0.2, np.float32),
                              np.zeros(k, np.int8), spec.epsilon, spec.clip_l1)
            return CODEC.encode(with_receipt(fb, attacker, world.edge_id.node_id))  # signed, as an agent sends it

        # under the victim's topic: PUBACKed by mosquitto, then dropped
        spoof = link.publish(feature_topic(e_short, v_short), seal(batch([10_001]), attacker, 1, world.edge_id.public, context=feature_topic(e_short, v_short).encode()), qos=1)
        spoof.wait_for_publish(10)
        # control message on its own topic, after the spoof (per-client order is kept)
        ctrl = link.publish(feature_topic(e_short, a_short), seal(batch([10_002]), attacker, 2, world.edge_id.public, context=feature_topic(e_short, a_short).encode()), qos=1)
        ctrl.wait_for_publish(10)
        wait_for(lambda: edge.ingestor.stats.accepted == accepted_before + 1, WAIT, "the attacker's own batch at the edge")
        # had the spoof arrived, the edge would have rejected it as topic_mismatch; nothing was rejected
        assert dict(edge.ingestor.stats.rejected) == rejected_before
        assert edge_counts(world.edge_db, attacker.node_id, spec.task_id, spec.feature_dim).sample_ids == [10_002]
        assert f"Denied PUBLISH from agent-{a_short}" in broker.log_text()

        # the edge acked the attacker on its own ack topic; the attacker never reads the victim's acks
        acks: list[str] = []
        wait_for(lambda: _drain(link, acks), WAIT, "the attacker's own acknowledgement")
        world.edge.link.publish(ack_topic(e_short, v_short), b"for the victim only", qos=1).wait_for_publish(10)
        with pytest.raises(queue.Empty):
            link.inbox.get(timeout=SILENCE)
        assert all(t == ack_topic(e_short, a_short) for t in acks)
    finally:
        link.stop()


def _drain(link: MqttLink, into: list[str]) -> bool:
    try:
        while True:
            into.append(link.inbox.get_nowait().topic)
    except queue.Empty:
        return bool(into)


def test_edge_and_coordinator_accounts_are_confined(tls_world) -> None:  # type: ignore[no-untyped-def]
    """An edge can neither publish a task nor acknowledge for another edge (the broker drops both)."""
    tw, device = tls_world
    broker = tw.broker
    rogue = "e" * 16
    rogue_link = MqttLink(tw.mqtt_for("edge", rogue), f"edge-{rogue}", [])
    d_short, e_short = short_id(device.node_id), short_id(tw.world.edge_id.node_id)
    listener_id = "f" * 16
    listener = MqttLink(tw.mqtt_for("device", listener_id), f"agent-{listener_id}", ["crowdfl/v1/tasks/#"])
    rogue_link.start()
    listener.start()
    try:
        wait_for(lambda: rogue_link.connected.is_set() and listener.connected.is_set(), WAIT, "both connections")
        while True:  # drop the retained task and round the listener gets on subscribe
            try:
                listener.inbox.get(timeout=SILENCE)
            except queue.Empty:
                break
        rogue_link.publish("crowdfl/v1/tasks/" + "ab" * 32, b"not from the coordinator", qos=1).wait_for_publish(10)
        rogue_link.publish(ack_topic(e_short, d_short), b"ack in another edge's name", qos=1).wait_for_publish(10)
        with pytest.raises(queue.Empty):
            listener.inbox.get(timeout=SILENCE)
        assert broker.log_text().count(f"Denied PUBLISH from edge-{rogue}") >= 2
    finally:
        rogue_link.stop()
        listener.stop()


# -- (c) smart plugs on the home's broker ----------------------------------------------------------


def test_plug_stream_skips_bad_input_and_stores_the_good(
    mosquitto_broker: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = mosquitto_broker
    plug_topics = ["tele/+/SENSOR", "stat/+/POWER", "shellies/#", "home/+/status/#"]
    plugs_creds = broker.add_user("home-plugs", write=plug_topics)
    reader_creds = broker.add_user("agent-plug-reader", read=plug_topics)
    plugs = (
        PlugSettings(topic="fridge_plug", kind="fridge"),
        PlugSettings(topic="shellyplug-s-7A1B2C", kind="washing_machine", firmware="shelly_gen1"),
        PlugSettings(topic="home/kettle", kind="kettle", firmware="shelly_gen2"),
    )
    cfg_check = AgentConfig(plugs=plugs)  # the same validation the TOML loader runs
    assert len(cfg_check.plugs) == 3
    source = PlugMqttSource(tls_settings(broker, "agent-plug-reader", reader_creds.password), plugs, "agent-plugs-test")
    home = MqttLink(tls_settings(broker, "home-plugs", plugs_creds.password), "home-plugs", [])
    usage = UsageLog(tmp_path / "usage.sqlite")
    stream: list[tuple[str, bytes, bool]] = [  # (topic, payload, good)
        ("tele/fridge_plug/SENSOR", b'{"Time":"2026-11-26T05:00:00","ENERGY":{"TotalStartTime":"2026-01-01T00:00:00","Total":12.345,"Yesterday":0.9,"Today":0.4,"Power":85,"Voltage":231,"Current":0.41}}', True),
        ("tele/fridge_plug/SENSOR", b'{"Time":"2026-11-26T05:00:10","ENERGY":{"Total":', False),  # truncated JSON
        ("tele/fridge_plug/SENSOR", b'{"Time":"2026-11-26T05:00:20","ENERGY":{"Total":NaN,"Power":80}}', False),
        ("tele/fridge_plug/SENSOR", b'{"Time":"2026-11-26T05:00:30","DS18B20":{"Temperature":4.1}}', False),  # no ENERGY
        ("tele/fridge_plug/SENSOR", b'{"ENERGY":{"Total":-1,"Power":80}}', False),
        ("tele/fridge_plug/SENSOR", b"\xff\xfe\x00garbage", False),
        ("tele/fridge_plug/SENSOR", b'{"ENERGY":{"Total":12.351,"Power":[40,42]}}', True),
        ("stat/fridge_plug/POWER", b"BLINK", False),
        ("stat/fridge_plug/POWER", b"OFF", True),  # OFF: a zero-power report at the last meter reading
        ("shellies/shellyplug-s-7A1B2C/relay/0/power", b"1830.5", False),  # state only, no report
        ("shellies/shellyplug-s-7A1B2C/relay/0/energy", b"456789", True),
        ("shellies/shellyplug-s-7A1B2C/relay/0/energy", b"lots", False),
        ("shellies/shellyplug-s-7A1B2C/relay/0/energy", b"1e400", False),
        ("home/kettle/status/switch:0", b'{"id":0,"source":"button","output":true,"apower":2150.2,"voltage":229.8,"aenergy":{"total":5310.27,"by_minute":[35.8,0,0],"minute_ts":1795000000}}', True),
        ("home/kettle/status/switch:0", b'{"id":1,"output":true,"apower":5,"aenergy":{"total":5310.3}}', False),
        ("home/kettle/status/switch:0", b'{"id":0,"apower":"lots","aenergy":{"total":5311}}', False),
        ("home/kettle/status/switch:0", b"[" * 5000 + b"]" * 5000, False),
        ("home/kettle/status/switch:0", b'{"x":"' + b"a" * 20000 + b'"}', False),  # oversized
        ("tele/fridge_plug/SENSOR", b'{"ENERGY":{"Total":12.360,"Power":90}}', True),
    ]
    caplog.set_level(logging.WARNING, logger="agent.sources")
    source.open()
    home.start()
    try:
        wait_for(lambda: source.link.connected.is_set() and home.connected.is_set(), WAIT, "both connections")
        wait_for(
            lambda: broker.log_text().count("Sending SUBACK to agent-plugs-test") >= len(source.decoder.topics()),
            WAIT, "the plug reader's subscriptions",
        )
        for topic, payload, _ in stream:
            home.publish(topic, payload, qos=1).wait_for_publish(10)
        wait_for(lambda: source.stats.received == len(stream), WAIT, f"all {len(stream)} plug messages")
        usage.append(source.poll(0))
        rows = usage.count()
    finally:
        home.stop()
        source.close()
        usage.close()
    good = [s for s in stream if s[2]]
    assert source.stats.reports == len(good) == rows == 6
    assert sum(source.stats.skipped.values()) == len(stream) - len(good) - 1  # the Gen1 power reading is state, not an error
    assert source.stats.skipped == {
        "bad_json": 3, "bad_value": 5, "no_energy": 1, "not_utf8": 1, "bad_state": 1, "oversized": 1,
    }
    usage = UsageLog(tmp_path / "usage.sqlite")
    try:
        import sqlite3

        con = sqlite3.connect(tmp_path / "usage.sqlite")
        got = con.execute("SELECT device_id, kind, power_w, energy_total_kwh, is_on FROM reports ORDER BY ts").fetchall()
        con.close()
    finally:
        usage.close()
    assert got == [
        ("tasmota:fridge_plug", "fridge", 85.0, 12.345, 1),
        ("tasmota:fridge_plug", "fridge", 82.0, 12.351, 1),
        ("tasmota:fridge_plug", "fridge", 0.0, 12.351, 0),
        ("shelly_gen1:shellyplug-s-7A1B2C", "washing_machine", 1830.5, pytest.approx(456789 / 60000), 1),
        ("shelly_gen2:home/kettle", "kettle", 2150.2, pytest.approx(5.31027), 1),
        ("tasmota:fridge_plug", "fridge", 90.0, 12.36, 1),
    ]
    warnings = [r.getMessage() for r in caplog.records if r.name == "agent.sources"]
    assert len(warnings) == sum(source.stats.skipped.values())
    assert any("bad_json" in w for w in warnings) and any("not_utf8" in w for w in warnings) and any("oversized" in w for w in warnings)
    assert not any(math.isnan(r[3]) for r in got)
