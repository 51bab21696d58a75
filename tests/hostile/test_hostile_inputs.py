"""Hostile input against the real parts: a real ``crowdfl-edge run`` process behind a real
mosquitto (per-user ACL), and the real coordinator API on waitress.

Each kind of attack is sent between good traffic. After each kind: both servers still serve,
nothing bad was stored, every good batch sent before, during and after is stored exactly once,
and the edge's memory stayed bounded. The counts are printed (and quoted in the README).
Bounded in count and time, loopback only.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

from crowdfl.envelope import open_envelope, seal
from crowdfl.identity import Identity, short_id
from crowdfl.messages import CODEC, Ack, FeatureBatch, Nack
from crowdfl.mqtt import Incoming, MqttLink, MqttSettings, ack_topic, feature_topic
from edge_server.store import EdgeStore
from tests.edge_server.test_crash_restart import EdgeProcess, coordinator_endpoint, edge_process  # noqa: F401  (fixture)
from tests.support.mosquitto import mosquitto_broker  # noqa: F401  (fixture)

pytestmark = [pytest.mark.realpart, pytest.mark.slow]

SAMPLES = 4
MAX_RSS_GROWTH_MB = 200


@dataclass
class Sender:
    """A device's MQTT link (its own broker user) that collects the edge's signed answers."""

    ident: Identity
    edge: Identity
    link: MqttLink
    acked: set[int] = field(default_factory=set)
    nacked: dict[int, str] = field(default_factory=dict)

    def collect(self) -> None:
        while not self.link.inbox.empty():
            m = self.link.inbox.get_nowait()
            opened = open_envelope(m.payload, lookup_sender=lambda s: self.edge.public if s == self.edge.node_id else None)
            answer = CODEC.decode(opened.body)
            if isinstance(answer, Ack):
                self.acked.update(int(s) for s in answer.seqs)
            elif isinstance(answer, Nack):
                self.nacked.update(zip((int(s) for s in answer.seqs), answer.reasons))

    def send(self, payload: bytes) -> None:
        self.link.publish(feature_topic(short_id(self.edge.node_id), short_id(self.ident.node_id)), payload, qos=1).wait_for_publish(30)


@dataclass
class Tally:
    kinds: list[str] = field(default_factory=list)
    hostile_sent: Counter[str] = field(default_factory=Counter)
    good_sent: int = 0
    good_stored: int = 0
    crashes: int = 0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wait(cond: Callable[[], bool], timeout: float, why: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {why()}")
        time.sleep(0.05)


@pytest.fixture
def rig(mosquitto_broker, coordinator_endpoint, tmp_path: Path) -> Iterator[dict[str, object]]:  # type: ignore[no-untyped-def]  # noqa: F811
    endpoint, url = coordinator_endpoint
    world = endpoint.world
    broker = mosquitto_broker
    edge, db_url, coord_creds = edge_process(world, broker, url, tmp_path, world.devices[:2], resubmit_every_s=1.0)

    def settings(creds) -> MqttSettings:  # type: ignore[no-untyped-def]
        return MqttSettings(host="127.0.0.1", port=broker.plain_port, username=creds.username, password=creds.password)

    def sender(ident: Identity) -> Sender:
        creds = broker.add_device(short_id(ident.node_id))
        short = short_id(ident.node_id)
        return Sender(ident, world.edge, MqttLink(settings(creds), f"dev-{short}", [ack_topic(short_id(world.edge.node_id), short)]))

    good = [sender(d) for d in world.devices[:2]]
    stranger = sender(Identity.generate())  # a broker user, never registered with the edge
    publisher = MqttLink(settings(coord_creds), "coordinator", [])
    links = [publisher] + [s.link for s in good + [stranger]]
    for link in links:
        link.start()
    try:
        for link in links:
            assert link.connected.wait(20)
        for m in world.control(selected=tuple(world.devices[:2])):
            publisher.publish(m.topic, m.payload, qos=1, retain=True).wait_for_publish(10)
        edge.start()
        yield {"world": world, "edge": edge, "good": good, "stranger": stranger, "db_url": db_url, "endpoint": endpoint}
    finally:
        try:
            assert edge.terminate() == 0, edge.log_tail()
        finally:
            for link in links:
                link.stop()


def test_hostile_mqtt_input_against_the_real_edge(rig: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:
    world = rig["world"]
    edge: EdgeProcess = rig["edge"]  # type: ignore[assignment]
    good: list[Sender] = rig["good"]  # type: ignore[assignment]
    stranger: Sender = rig["stranger"]  # type: ignore[assignment]
    dev_a, dev_b = good
    tally = Tally()
    next_seq = {0: 1, 1: 1}
    good_batches: dict[tuple[int, int], Incoming] = {}
    other_edge = Identity.generate()
    assert edge.proc is not None

    def good_one(i: int) -> Incoming:
        seq = next_seq[i]
        next_seq[i] += 1
        m = world.batch(world.devices[i], seq, list(range(seq * SAMPLES, (seq + 1) * SAMPLES)), seed=i * 1000)
        good_batches[(i, seq)] = m
        tally.good_sent += 1
        good[i].send(m.payload)
        return m

    # hostile batches get their receipts from a scratch history: the good batches' receipts must
    # cover exactly what the edge stores (crowdfl/receipts.py), not batches it rightly refused
    scratch = replace(world, history={})

    def feature(i: int, **kw: object) -> FeatureBatch:
        seq = 10_000 + sum(tally.hostile_sent.values())
        m = scratch.batch(world.devices[i], seq, [900_000 + seq * 2, 900_000 + seq * 2 + 1], seed=seq)
        opened = open_envelope(m.payload, lookup_sender=lambda s: world.devices[i].public, recipient=world.edge, context=m.topic.encode())
        return replace(CODEC.decode(opened.body, FeatureBatch), **kw)  # type: ignore[arg-type]

    def topic_of(ident: Identity) -> bytes:
        return feature_topic(short_id(world.edge.node_id), short_id(ident.node_id)).encode()

    def retired(payload: bytes) -> bytes:
        return payload[:4] + b"\x01" + payload[5:]  # version byte 1: per-message signatures, retired

    def hostile_seq() -> int:
        return 10_000 + sum(tally.hostile_sent.values())

    def template() -> bytes:
        return scratch.batch(world.devices[0], hostile_seq(), [800_000 + hostile_seq()], seed=7).payload

    def flipped() -> bytes:
        raw = bytearray(template())
        raw[len(raw) // 2] ^= 0x10
        return bytes(raw)

    def poisoned(value: float) -> FeatureBatch:
        b = feature(0)
        features = np.array(b.features, copy=True)
        features[0, 0] = value
        return replace(b, features=features)

    nan, inf = poisoned(float("nan")), poisoned(float("inf"))

    kinds: dict[str, tuple[Sender, Callable[[], list[bytes]]]] = {
        "malformed": (stranger, lambda: [os.urandom(n) for n in (0, 1, 7, 64, 500)]),
        "truncated": (dev_a, lambda: [template()[:n] for n in (10, 40, 100, 200)]),
        "oversized": (stranger, lambda: [b"\x00" * (2 * 1024 * 1024), b"CF" + os.urandom(1024 * 1024)]),
        "bit_flipped": (dev_a, lambda: [flipped() for _ in range(5)]),
        "re_signed": (stranger, lambda: [seal(CODEC.encode(feature(0)), stranger.ident, hostile_seq(), world.edge.public, context=topic_of(stranger.ident))]),
        "wrong_recipient": (dev_a, lambda: [seal(CODEC.encode(feature(0)), world.devices[0], hostile_seq(), other_edge.public, context=topic_of(world.devices[0]))]),
        "unknown_sender": (stranger, lambda: [seal(CODEC.encode(feature(0)), stranger.ident, hostile_seq() + k, world.edge.public, context=topic_of(stranger.ident)) for k in range(5)]),
        "nan_inf": (dev_a, lambda: [seal(CODEC.encode(b), world.devices[0], hostile_seq() + k, world.edge.public, context=topic_of(world.devices[0])) for k, b in enumerate((nan, inf))]),
        # a device that has not been updated: the retired envelope version, refused (and counted) before any crypto
        "retired_version": (dev_a, lambda: [retired(template())]),
        "replayed": (dev_a, lambda: [good_batches[(0, 1)].payload] * 5),
        "out_of_order": (dev_b, lambda: []),  # good batches sent newest first, below
        "flood": (stranger, lambda: [os.urandom(200) for _ in range(300)]),
    }

    def stored_ok() -> bool:
        for s in good:
            s.collect()
        return all(seq in good[i].acked for (i, seq) in good_batches)

    # warm-up: good traffic until both customers are trained (TensorFlow loaded), then the baseline
    endpoint = rig["endpoint"]
    good_one(0)
    good_one(1)
    _wait(stored_ok, 120, lambda: f"warm-up not acknowledged\n{edge.log_tail()}")
    _wait(lambda: len(endpoint.posts) >= 2, 300, lambda: f"warm-up not trained\n{edge.log_tail()}")  # type: ignore[attr-defined]
    rss0 = _rss_mb(edge.proc.pid)

    for kind, (who, make) in kinds.items():
        tally.kinds.append(kind)
        good_one(0)  # before
        if kind == "out_of_order":
            batch = [world.batch(world.devices[1], seq, list(range(seq * SAMPLES, (seq + 1) * SAMPLES)), seed=1000) for seq in range(next_seq[1], next_seq[1] + 5)]
            for m in reversed(batch):
                good_batches[(1, parse_seq(m))] = m
                tally.good_sent += 1
                dev_b.send(m.payload)
            next_seq[1] += 5
        payloads = make()
        for n, p in enumerate(payloads):
            who.send(p)
            tally.hostile_sent[kind] += 1
            if n == len(payloads) // 2:
                good_one(1)  # during
        good_one(0)  # after
        _wait(stored_ok, 120, lambda: f"{kind}: good batches not all acknowledged\n{edge.log_tail()}")
        health = edge.health()
        if health.get("status") != "ok":
            tally.crashes += 1
        assert health.get("status") == "ok", (kind, health, edge.log_tail())
        assert _rss_mb(edge.proc.pid) - rss0 < MAX_RSS_GROWTH_MB, (kind, _rss_mb(edge.proc.pid), rss0)

    # nothing bad stored, every good batch exactly once, byte for byte
    store = EdgeStore(str(rig["db_url"]))
    try:
        for i in (0, 1):
            d = world.devices[i]
            seqs = [seq for (j, seq) in good_batches if j == i]
            known = store.known_envelopes([(d.node_id, s) for s in seqs])
            assert len(known) == len(seqs)
            data = store.customer_data(d.node_id, world.spec.task_id, world.spec.feature_dim)
            assert sorted(int(x) for x in data.sample_ids) == sorted(x for seq in seqs for x in range(seq * SAMPLES, (seq + 1) * SAMPLES))
            tally.good_stored += len(seqs)
        counts = store.counts()
        rejections = store.rejection_counts()
    finally:
        store.close()
    assert tally.good_stored == tally.good_sent
    assert rejections.get("retired_version") == 1  # refused with its own, counted reason

    def nacks_in() -> bool:
        dev_a.collect()
        return len(dev_a.nacked) >= 2  # NaN, Inf: authentic (the channel tag verified), refused for good

    _wait(nacks_in, 60, lambda: f"nacks {dev_a.nacked}\n{edge.log_tail()}")
    assert dev_a.nacked and set(dev_a.nacked.values()) <= {"non_finite", "out_of_bound", "seq_reuse"}
    assert edge.health().get("status") == "ok"
    summary = {"kinds": len(tally.kinds), "hostile_messages": sum(tally.hostile_sent.values()), "good_sent": tally.good_sent,
               "good_stored_once": tally.good_stored, "crashes": tally.crashes, "edge_rss_growth_mb": round(_rss_mb(edge.proc.pid) - rss0, 1),
               "rejections_by_reason": rejections, "stored_batches": counts.get("batches")}
    with capsys.disabled():
        print("\n[hostile mqtt] " + json.dumps(summary, sort_keys=True))


def parse_seq(m: Incoming) -> int:
    from crowdfl.envelope import parse

    return parse(m.payload).seq
