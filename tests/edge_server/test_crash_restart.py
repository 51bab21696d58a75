"""kill -9 of a real ``crowdfl-edge run`` process, during ingest and during training, on a real mosquitto.

What must hold afterwards: every batch the edge acknowledged is in its database (devices resend
only what was not acknowledged, as agent/uplink.py does); after the resends every batch is stored
exactly once; every selected customer gets exactly one update, which the coordinator (a
recording HTTP endpoint that answers like coordinator/service.py) records once, including the
updates that were saved but not yet submitted when the process died.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, Response, jsonify, request
from werkzeug.serving import make_server

from crowdfl.envelope import open_envelope, parse
from crowdfl.identity import Identity, short_id
from crowdfl.messages import CODEC, Ack, ModelUpdate
from crowdfl.mqtt import MqttLink, MqttSettings, ack_topic
from edge_server.store import EdgeStore
from tests.edge_server.fakes import World, make_world
from tests.support.realparts import free_port

pytestmark = [pytest.mark.realpart, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DEVICES = 6
BATCHES = 40  # per device
SAMPLES = 8  # per batch


@dataclass
class CoordinatorEndpoint:
    """Serves the initial model and records every POSTed update, answering like the real intake."""

    world: World
    available: bool = True
    posts: list[tuple[str, str]] = field(default_factory=list)  # (digest, answer)
    first: dict[tuple[str, int, str], str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Flask:
        app = Flask("recording-coordinator")

        @app.get("/api/v1/artifacts/<address>")
        def artifact(address: str) -> Response:
            return Response(self.world.fetch(address), mimetype="application/octet-stream")

        @app.post("/api/v1/updates")
        def updates():  # type: ignore[no-untyped-def]
            if not self.available:
                return jsonify({"error": "unavailable"}), 503
            sealed = parse(request.get_data())
            assert sealed.sender_id == self.world.edge.node_id
            upd = CODEC.decode(sealed.body, ModelUpdate)
            key = (upd.task_id, upd.round, upd.customer)
            with self.lock:
                prior = self.first.setdefault(key, sealed.digest)
                answer = "received" if prior == sealed.digest and not any(d == sealed.digest for d, _ in self.posts) else (
                    "duplicate" if prior == sealed.digest else "conflict"
                )
                self.posts.append((sealed.digest, answer))
            if answer == "conflict":
                return jsonify({"status": "rejected", "error": "conflict", "detail": "another update came first"}), 409
            return jsonify({"status": answer})

        return app


@pytest.fixture
def coordinator_endpoint() -> Iterator[tuple[CoordinatorEndpoint, str]]:
    world = make_world(devices=DEVICES)
    endpoint = CoordinatorEndpoint(world)
    server = make_server("127.0.0.1", 0, endpoint.app(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield endpoint, f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


class EdgeProcess:
    """``python -m edge_server.cli --config ... run`` as its own process."""

    def __init__(self, config: Path, log: Path, http_port: int) -> None:
        self.config, self.log, self.http_port = config, log, http_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_server.cli", "--config", str(self.config), "run"],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"},
            )
        wait_for(lambda: self.health().get("status") == "ok", timeout, self)

    def health(self) -> dict[str, object]:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"edge exited with {self.proc.returncode}\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]
        except OSError:
            return {}

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return -9

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


def edge_process(
    world: World, broker: Any, url: str, tmp_path: Path, devices: Sequence[Identity], resubmit_every_s: float,
    mqtt_extra: str = "",
) -> tuple[EdgeProcess, str, Any]:
    """An edge of ``world`` configured (not started) against ``broker`` and the coordinator at ``url``:
    its identity and database (``devices`` registered) under tmp_path/edge, broker accounts for the
    edge and the coordinator. Returns (the edge process, its database URL, the coordinator's
    broker credentials). ``mqtt_extra``: more lines for the edge's [mqtt] table."""
    state = tmp_path / "edge"
    state.mkdir()
    world.edge.save(state / "identity.json")
    edge_creds = broker.add_edge(short_id(world.edge.node_id))
    coord_creds = broker.add_coordinator(short_id(world.coordinator.node_id))  # publishes the retained control messages
    db_url = f"sqlite:///{state / 'edge.sqlite'}"
    store = EdgeStore(db_url)
    store.register_devices([(d.node_id, d.public.enc_key.hex()) for d in devices])
    store.close()
    http_port = free_port()
    config = tmp_path / "edge.toml"
    config.write_text(
        f'state_dir = "{state}"\nresubmit_every_s = {resubmit_every_s}\nseed = 1\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.plain_port}\nusername = "{edge_creds.username}"\npassword = "{edge_creds.password}"\n'
        f'{mqtt_extra}'
        f'[coordinator]\nurl = "{url}"\nsign_key = "{world.coordinator.public.sign_key.hex()}"\n'
        f'[http]\nport = {http_port}\n'
    )
    return EdgeProcess(config, tmp_path / "edge.log", http_port), db_url, coord_creds


def wait_for(cond: Callable[[], bool], timeout: float, edge: EdgeProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out" + (f"\n--- edge log ---\n{edge.log_tail()}" if edge else ""))
        time.sleep(0.02)


class Device:
    """A device's uplink reduced to what matters here: publish, collect signed acks."""

    def __init__(self, ident: Identity, edge: Identity, settings: MqttSettings) -> None:
        self.ident, self.edge = ident, edge
        self.link = MqttLink(settings, f"dev-{short_id(ident.node_id)}", [ack_topic(short_id(edge.node_id), short_id(ident.node_id))])
        self.acked: set[int] = set()

    def collect_acks(self) -> None:
        while not self.link.inbox.empty():
            m = self.link.inbox.get_nowait()
            opened = open_envelope(m.payload, lookup_sender=lambda s: self.edge.public if s == self.edge.node_id else None)
            ack = CODEC.decode(opened.body, Ack)
            assert ack.device == self.ident.node_id
            self.acked.update(int(s) for s in ack.seqs)


def _collect(devices: list[Device]) -> int:
    """Take in every acknowledgement that has arrived; how many batches are acknowledged so far."""
    for d in devices:
        d.collect_acks()
    return sum(len(d.acked) for d in devices)


def test_kill_9_during_ingest_and_training_loses_nothing_and_submits_once(
    mosquitto_broker, coordinator_endpoint, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    endpoint, url = coordinator_endpoint
    world = endpoint.world
    broker = mosquitto_broker
    edge, db_url, coord_creds = edge_process(world, broker, url, tmp_path, world.devices, resubmit_every_s=0.5)

    devices = []
    for d in world.devices:
        creds = broker.add_device(short_id(d.node_id))
        devices.append(Device(d, world.edge, MqttSettings(host="127.0.0.1", port=broker.plain_port, username=creds.username, password=creds.password)))
    publisher = MqttLink(
        MqttSettings(host="127.0.0.1", port=broker.plain_port, username=coord_creds.username, password=coord_creds.password), "coordinator", []
    )
    envelopes = {
        (i, seq): world.batch(d.ident, seq, list(range(seq * SAMPLES, (seq + 1) * SAMPLES)), seed=i * 1000)
        for i, d in enumerate(devices) for seq in range(1, BATCHES + 1)
    }
    for link in [publisher] + [d.link for d in devices]:
        link.start()
    try:
        for link in [publisher] + [d.link for d in devices]:
            assert link.connected.wait(10)
        # --- run A: killed during ingest ------------------------------------------------------
        edge.start()
        for m in world.control(selected=world.devices):
            publisher.publish(m.topic, m.payload, qos=1, retain=True).wait_for_publish(10)
        order = sorted(envelopes, key=lambda k: (k[1], k[0]))
        for n, key in enumerate(order):
            m = envelopes[key]
            devices[key[0]].link.publish(m.topic, m.payload, qos=1)
            time.sleep(0.004)
            if n == len(order) // 3:
                # Mid-stream, once the edge has acknowledged something (however slow a loaded
                # machine makes it): the inbox, the queue and an open drain die with it.
                wait_for(lambda: _collect(devices) > 0, 60, edge)
                edge.kill9()
        _collect(devices)
        acked_before = {(i, s) for i, d in enumerate(devices) for s in d.acked}
        assert acked_before, f"nothing was acknowledged before the kill\n{edge.log_tail()}"
        store = EdgeStore(db_url)
        stored = {(d, s): g for d, s, g in _batches(store)}
        store.close()
        for i, s in acked_before:
            assert stored.get((world.devices[i].node_id, s)) == parse(envelopes[(i, s)].payload).digest, "an acknowledged batch was lost"

        # --- run B: coordinator down, killed during training ----------------------------------
        endpoint.available = False
        edge.start()
        _resend_until_acked(devices, envelopes, edge)

        def updates() -> list[tuple[str, int, str, str, bool]]:
            s = EdgeStore(db_url)
            try:
                return s.updates()
            finally:
                s.close()

        wait_for(lambda: len(updates()) >= 1, 120, edge)
        edge.kill9()
        saved_b = updates()
        assert 1 <= len(saved_b) < DEVICES, f"the kill did not land during training: {len(saved_b)} updates saved"
        assert not any(sub for *_, sub in saved_b) and not endpoint.posts

        # --- run C: coordinator up; everything must complete -------------------------------------
        endpoint.available = True
        edge.start()
        wait_for(lambda: len(updates()) == DEVICES and all(sub for *_, sub in updates()), 180, edge)
        time.sleep(1.0)  # a resubmission round after completion must not post anything new
        assert edge.terminate() == 0, edge.log_tail()

        store = EdgeStore(db_url)
        try:
            rows = _batches(store)
            assert len(rows) == DEVICES * BATCHES and len({(d, s) for d, s, _ in rows}) == len(rows)
            assert {(d, s): g for d, s, g in rows} == {
                (world.devices[i].node_id, s): parse(m.payload).digest for (i, s), m in envelopes.items()
            }
            assert store.counts()["samples"] == DEVICES * BATCHES * SAMPLES
            assert store.rejection_counts() == {}, "a valid message was rejected across the restarts"
            final = store.updates()
        finally:
            store.close()
        # one update per selected customer; the ones saved in run B were submitted as saved, not retrained
        assert sorted(c for _, _, c, _, _ in final) == sorted(d.node_id for d in world.devices)
        saved_digests = {c: g for _, _, c, g, _ in saved_b}
        assert all(g == saved_digests[c] for _, _, c, g, _ in final if c in saved_digests)
        # the coordinator recorded each update exactly once, with the digest the edge stored
        assert {k[2]: g for k, g in endpoint.first.items()} == {c: g for _, _, c, g, _ in final}
        answers = [a for _, a in endpoint.posts]
        assert answers.count("received") == DEVICES and "conflict" not in answers
        # the only repeat at-least-once allows: identical bytes after a kill between POST and mark
        assert answers.count("duplicate") == len(endpoint.posts) - DEVICES == 0, endpoint.posts
        for (_, _, customer), digest in endpoint.first.items():
            assert sum(1 for g, _ in endpoint.posts if g == digest) == 1, customer
    finally:
        edge.terminate()
        for link in [publisher] + [d.link for d in devices]:
            link.stop()


def _batches(store: EdgeStore) -> list[tuple[str, int, str]]:
    from sqlalchemy import select

    from edge_server.store import BatchRow

    with store.sessions() as s:
        return [(d, int(q), g) for d, q, g in s.execute(select(BatchRow.device, BatchRow.seq, BatchRow.digest))]


def _resend_until_acked(devices: list[Device], envelopes: dict, edge: EdgeProcess, timeout: float = 60.0) -> None:  # type: ignore[type-arg]
    """What agent/uplink.py does: republish every envelope that was not acknowledged, until it is."""
    deadline = time.monotonic() + timeout
    while True:
        for d in devices:
            d.collect_acks()
        missing = [(i, s) for (i, s) in envelopes if s not in devices[i].acked]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(missing)} batches never acknowledged\n{edge.log_tail()}")
        for i, s in missing:
            devices[i].link.publish(envelopes[(i, s)].topic, envelopes[(i, s)].payload, qos=1)
        time.sleep(1.0)
