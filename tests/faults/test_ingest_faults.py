"""Faults on the ingest path, in the middle of a round: a real ``crowdfl-edge run`` process behind a
real mosquitto (per-user ACL), devices publishing signed batches and resending what the edge has
not acknowledged (as agent/uplink.py does), the coordinator a recording endpoint that answers as
coordinator/service.py does.

1. mosquitto is killed with SIGKILL a third of the way through the devices' batches, and
   restarted on the same ports (no persistence file: its queues die with it). Every client
   reconnects by itself.
2. the edge is killed with SIGKILL two thirds of the way through, and restarted.

Then: every batch the edge acknowledged before a kill is in its database; after the resends
every batch is stored exactly once (its digest the one the device signed) and every sample
counted once; nothing was rejected; the round completes: one update per selected customer,
recorded once by the coordinator.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from crowdfl.envelope import parse
from crowdfl.identity import short_id
from crowdfl.mqtt import MqttLink, MqttSettings
from edge_server.store import EdgeStore
from tests.edge_server.test_crash_restart import (  # noqa: F401  (coordinator_endpoint: fixture)
    CoordinatorEndpoint,
    Device,
    EdgeProcess,
    _batches,
    _collect,
    _resend_until_acked,
    coordinator_endpoint,
    edge_process,
    wait_for,
)
from tests.support.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.realpart, pytest.mark.slow]

DEVICES = 4
BATCHES = 12  # per device
SAMPLES = 8  # per batch


@pytest.fixture
def rig(mosquitto_broker: MosquittoBroker, coordinator_endpoint: tuple[CoordinatorEndpoint, str], tmp_path: Path) -> Iterator[dict[str, object]]:  # noqa: F811
    endpoint, url = coordinator_endpoint
    world = endpoint.world
    broker = mosquitto_broker
    edge, db_url, coord_creds = edge_process(
        world, broker, url, tmp_path, world.devices[:DEVICES], resubmit_every_s=0.5,
        mqtt_extra="reconnect_min_s = 1\nreconnect_max_s = 2\n",
    )

    def settings(creds) -> MqttSettings:  # type: ignore[no-untyped-def]
        return MqttSettings(host="127.0.0.1", port=broker.plain_port or 0, username=creds.username, password=creds.password,
                            reconnect_min_s=1, reconnect_max_s=2)

    devices = [Device(d, world.edge, settings(broker.add_device(short_id(d.node_id)))) for d in world.devices[:DEVICES]]
    publisher = MqttLink(settings(coord_creds), "coordinator", [])
    links = [publisher] + [d.link for d in devices]
    for link in links:
        link.start()
    try:
        for link in links:
            assert link.connected.wait(20)
        yield {"world": world, "edge": edge, "devices": devices, "publisher": publisher, "db_url": db_url,
               "endpoint": endpoint, "broker": broker, "links": links}
    finally:
        try:
            edge.terminate()
        finally:
            for link in links:
                link.stop()
            if broker._proc is None or broker._proc.poll() is not None:
                broker.restart()  # the module's broker must be up for the other tests


def test_kill9_of_mosquitto_and_of_the_edge_mid_round_store_each_batch_once(rig: dict[str, object]) -> None:
    world = rig["world"]
    edge: EdgeProcess = rig["edge"]  # type: ignore[assignment]
    devices: list[Device] = rig["devices"]  # type: ignore[assignment]
    publisher: MqttLink = rig["publisher"]  # type: ignore[assignment]
    broker: MosquittoBroker = rig["broker"]  # type: ignore[assignment]
    endpoint: CoordinatorEndpoint = rig["endpoint"]  # type: ignore[assignment]
    links: list[MqttLink] = rig["links"]  # type: ignore[assignment]
    db_url: str = rig["db_url"]  # type: ignore[assignment]
    selected = tuple(world.devices[:DEVICES])  # type: ignore[attr-defined]
    envelopes = {
        (i, seq): world.batch(d.ident, seq, list(range(seq * SAMPLES, (seq + 1) * SAMPLES)), seed=i * 1000)  # type: ignore[attr-defined]
        for i, d in enumerate(devices) for seq in range(1, BATCHES + 1)
    }
    order = sorted(envelopes, key=lambda k: (k[1], k[0]))

    def stored() -> dict[tuple[str, int], str]:
        store = EdgeStore(db_url)
        try:
            return {(d, s): g for d, s, g in _batches(store)}
        finally:
            store.close()

    def acked_are_stored() -> None:
        _collect(devices)
        have = stored()
        for i, d in enumerate(devices):
            for s in d.acked:
                assert have.get((d.ident.node_id, s)) == parse(envelopes[(i, s)].payload).digest, "an acknowledged batch was lost"

    edge.start()
    for m in world.control(selected=selected):  # type: ignore[attr-defined]
        publisher.publish(m.topic, m.payload, qos=1, retain=True).wait_for_publish(10)
    for n, key in enumerate(order):
        m = envelopes[key]
        devices[key[0]].link.publish(m.topic, m.payload, qos=1)
        if n == len(order) // 3:
            # fault 1: the broker dies mid-round, once the edge has acknowledged something
            wait_for(lambda: _collect(devices) > 0, 60, edge)
            broker.kill9()
            acked_are_stored()
            broker.restart()
            wait_for(lambda: all(link.connected.is_set() for link in links), 60, edge)
            # the broker lost its retained control messages: the coordinator publishes them again (republish)
            for c in world.control(selected=selected):  # type: ignore[attr-defined]
                publisher.publish(c.topic, c.payload, qos=1, retain=True).wait_for_publish(10)
        if n == 2 * len(order) // 3:
            # fault 2: the edge dies mid-round (its inbox, queue and an open drain with it)
            # once everything sent so far is acknowledged: what was published while the edge had
            # not yet subscribed again after the broker's restart is lost (MQTT keeps no message
            # for a subscription that does not exist yet) and comes back through the resends
            _resend_until_acked(devices, {k: envelopes[k] for k in order[: n + 1]}, edge, timeout=120)
            edge.kill9()
            acked_are_stored()
            edge.start()
    _resend_until_acked(devices, envelopes, edge, timeout=120)
    acked_are_stored()

    def updates() -> list[tuple[str, int, str, str, bool]]:
        s = EdgeStore(db_url)
        try:
            return s.updates()
        finally:
            s.close()

    wait_for(lambda: len(updates()) == DEVICES and all(sub for *_, sub in updates()), 180, edge)
    health = edge.health()
    assert health.get("status") == "ok"
    assert edge.terminate() == 0, edge.log_tail()

    store = EdgeStore(db_url)
    try:
        rows = _batches(store)
        assert len(rows) == DEVICES * BATCHES and len({(d, s) for d, s, _ in rows}) == len(rows), "a batch was stored twice"
        assert {(d, s): g for d, s, g in rows} == {
            (devices[i].ident.node_id, s): parse(m.payload).digest for (i, s), m in envelopes.items()
        }
        assert store.counts()["samples"] == DEVICES * BATCHES * SAMPLES, "a sample was counted twice or lost"
        assert store.rejection_counts() == {}, "a valid message was rejected across the faults"
        final = store.updates()
    finally:
        store.close()
    assert sorted(c for _, _, c, _, _ in final) == sorted(d.ident.node_id for d in devices)
    assert {k[2]: g for k, g in endpoint.first.items()} == {c: g for _, _, c, g, _ in final}
    answers = [a for _, a in endpoint.posts]
    assert answers.count("received") == DEVICES and "conflict" not in answers
    # the edge ran twice (the first start and the restart after the kill): it never died on its own
    assert edge.log.read_text(errors="replace").count(" running; broker ") == 2, edge.log_tail(200)
