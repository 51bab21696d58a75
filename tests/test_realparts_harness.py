"""The real-part harness proves itself: real mosquitto (TLS, passwords, ACL, mutual TLS) driven
by plain paho-mqtt 2, and a real PostgreSQL driven by SQLAlchemy 2."""

from __future__ import annotations

import queue
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tests.support.mosquitto import (
    MosquittoBroker,
    MqttCredentials,
    ack_topic,
    feature_topic,
    round_topic,
    task_topic,
)
from tests.support.postgres import PostgresServer
from tests.support.realparts import require_real_part

# Fixtures mosquitto_broker and postgres_server (move this line to tests/conftest.py to share them).

WAIT = 5.0  # generous bound for anything that must happen
SILENCE = 0.5  # extra wait before asserting that something did NOT happen


class Peer:
    """A paho client with its callbacks turned into queues, so tests can wait with timeouts."""

    def __init__(self, client: mqtt.Client, client_id: str) -> None:
        self.client = client
        self.client_id = client_id
        self.connected = False
        # CONNACK reason code, or None when the connection dropped before any CONNACK.
        self.connacks: queue.Queue[ReasonCode | None] = queue.Queue()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.pubacks: queue.Queue[tuple[int, ReasonCode]] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        client.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.put(rc)
        client.on_subscribe = lambda _c, _u, _mid, rcs, _p: self.subacks.put(rcs)
        client.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.put((mid, rc))
        client.on_message = lambda _c, _u, msg: self.messages.put(
            (msg.topic, bytes(msg.payload))
        )
        client.on_disconnect = self._on_disconnect

    def _on_disconnect(
        self,
        _c: mqtt.Client,
        _u: object,
        flags: mqtt.DisconnectFlags,
        _rc: ReasonCode,
        _p: object,
    ) -> None:
        if not self.connected:
            self.connacks.put(None)

    def connect(self, host: str, port: int) -> ReasonCode | None:
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        reason = self.connacks.get(timeout=WAIT)
        self.connected = reason is not None and not reason.is_failure
        return reason

    def subscribe(self, topic: str, qos: int = 1) -> list[ReasonCode]:
        self.client.subscribe(topic, qos=qos)
        return self.subacks.get(timeout=WAIT)

    def publish_acked(self, topic: str, payload: bytes, qos: int = 1) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=WAIT)
        mid, rc = self.pubacks.get(timeout=WAIT)
        assert mid == info.mid
        return rc

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.stop()


def make_peer(
    peers: list[Peer],
    broker: MosquittoBroker,
    name: str,
    *,
    password_login: MqttCredentials | tuple[str, str] | None = None,
    cert: MqttCredentials | tuple[Path, Path] | None = None,
    tls: bool = True,
) -> Peer:
    client_id = f"{name}-{uuid.uuid4().hex[:6]}"
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
    )
    # A refused client must not hammer the broker with reconnects during the test.
    client.reconnect_delay_set(min_delay=30, max_delay=30)
    if tls:
        certfile = keyfile = None
        if isinstance(cert, MqttCredentials):
            certfile, keyfile = str(cert.certfile), str(cert.keyfile)
        elif cert is not None:
            certfile, keyfile = str(cert[0]), str(cert[1])
        client.tls_set(
            ca_certs=str(broker.ca_path),
            certfile=certfile,
            keyfile=keyfile,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if isinstance(password_login, MqttCredentials):
        client.username_pw_set(password_login.username, password_login.password)
    elif password_login is not None:
        client.username_pw_set(*password_login)
    peer = Peer(client, client_id)
    peers.append(peer)
    return peer


def drain(
    peer: Peer, until_payload: bytes, timeout: float = WAIT
) -> list[tuple[str, bytes]]:
    """Everything received up to and including the message with ``until_payload``."""
    got: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"control message {until_payload!r} never arrived; got {got}"
            )
        item = peer.messages.get(timeout=remaining)
        got.append(item)
        if item[1] == until_payload:
            return got


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def connected_edge(peers: list[Peer], broker: MosquittoBroker, edge_id: str) -> Peer:
    edge = make_peer(peers, broker, edge_id, password_login=broker.add_edge(edge_id))
    assert edge.connect(broker.host, broker.tls_port) == 0
    assert [rc.value for rc in edge.subscribe(f"crowdfl/v1/feat/{edge_id}/#")] == [1]
    return edge


# --- the skip/fail rule -------------------------------------------------------------------


def test_require_real_part_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="mosquitto"):
        require_real_part("mosquitto", False, "not installed")
    require_real_part("mosquitto", True, "unused")


def test_require_real_part_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        require_real_part("mosquitto", False, "not installed")
    require_real_part("mosquitto", True, "unused")


# --- mosquitto ---------------------------------------------------------------------------


@pytest.mark.realpart
@pytest.mark.slow
@pytest.mark.parametrize("listener", ["tls", "plain"])
def test_device_qos1_publish_reaches_its_edge(
    mosquitto_broker: MosquittoBroker, peers: list[Peer], listener: str
) -> None:
    broker = mosquitto_broker
    edge_id, device_id = uid("edge"), uid("dev")
    edge = connected_edge(peers, broker, edge_id)
    creds = broker.add_device(device_id)
    device = make_peer(
        peers, broker, device_id, password_login=creds, tls=listener == "tls"
    )
    port = broker.tls_port if listener == "tls" else broker.plain_port
    assert port is not None
    assert device.connect(broker.host, port) == 0
    if listener == "tls":
        tls_version = device.client.socket().version()  # type: ignore[union-attr]
        assert tls_version in ("TLSv1.2", "TLSv1.3")

    assert device.publish_acked(feature_topic(edge_id, device_id), b"features-1") == 0
    assert edge.messages.get(timeout=WAIT) == (
        feature_topic(edge_id, device_id),
        b"features-1",
    )


@pytest.mark.realpart
@pytest.mark.slow
def test_spoofed_device_topic_is_dropped_silently(
    mosquitto_broker: MosquittoBroker, peers: list[Peer]
) -> None:
    broker = mosquitto_broker
    edge_id, device_id, victim_id = uid("edge"), uid("dev"), uid("dev")
    edge = connected_edge(peers, broker, edge_id)
    broker.add_device(victim_id)
    device = make_peer(
        peers, broker, device_id, password_login=broker.add_device(device_id)
    )
    assert device.connect(broker.host, broker.tls_port) == 0

    # The broker PUBACKs the forbidden publish (the deny is silent) ...
    assert device.publish_acked(feature_topic(edge_id, victim_id), b"spoof") == 0
    # ... so prove non-arrival: a later control message from the same publisher does arrive,
    # and the edge saw nothing else before it (per-client order is kept) or shortly after.
    assert device.publish_acked(feature_topic(edge_id, device_id), b"control") == 0
    assert drain(edge, b"control") == [(feature_topic(edge_id, device_id), b"control")]
    with pytest.raises(queue.Empty):
        edge.messages.get(timeout=SILENCE)
    assert f"Denied PUBLISH from {device.client_id}" in broker.log_text()


@pytest.mark.realpart
@pytest.mark.slow
def test_edge_does_not_receive_another_edges_features(
    mosquitto_broker: MosquittoBroker, peers: list[Peer]
) -> None:
    broker = mosquitto_broker
    owner_id, intruder_id, device_id = uid("edge"), uid("edge"), uid("dev")
    owner = connected_edge(peers, broker, owner_id)
    intruder = connected_edge(peers, broker, intruder_id)
    # mosquitto 2.0 grants the SUBACK (QoS 1) and applies "read" at delivery instead.
    assert [rc.value for rc in intruder.subscribe(f"crowdfl/v1/feat/{owner_id}/#")] == [
        1
    ]
    device = make_peer(
        peers, broker, device_id, password_login=broker.add_device(device_id)
    )
    assert device.connect(broker.host, broker.tls_port) == 0

    assert device.publish_acked(feature_topic(owner_id, device_id), b"for-owner") == 0
    assert device.publish_acked(feature_topic(intruder_id, device_id), b"control") == 0
    assert owner.messages.get(timeout=WAIT) == (
        feature_topic(owner_id, device_id),
        b"for-owner",
    )
    assert drain(intruder, b"control") == [
        (feature_topic(intruder_id, device_id), b"control")
    ]
    with pytest.raises(queue.Empty):
        intruder.messages.get(timeout=SILENCE)


@pytest.mark.realpart
@pytest.mark.slow
def test_acl_matches_crowdfl_topics(
    mosquitto_broker: MosquittoBroker, peers: list[Peer]
) -> None:
    """Tasks come only from the coordinator; acks only from the device's edge, read only by that device."""
    broker = mosquitto_broker
    coord_id, edge_id, other_edge_id = uid("coord"), uid("edge"), uid("edge")
    device_id, other_device_id = uid("dev"), uid("dev")
    coord = make_peer(peers, broker, coord_id, password_login=broker.add_coordinator(coord_id))
    edge = make_peer(peers, broker, edge_id, password_login=broker.add_edge(edge_id))
    rogue = make_peer(peers, broker, other_edge_id, password_login=broker.add_edge(other_edge_id))
    device = make_peer(peers, broker, device_id, password_login=broker.add_device(device_id))
    other = make_peer(peers, broker, other_device_id, password_login=broker.add_device(other_device_id))
    for peer in (coord, edge, rogue, device, other):
        assert peer.connect(broker.host, broker.tls_port) == 0
    task = uuid.uuid4().hex
    for peer in (device, edge):
        peer.subscribe(f"crowdfl/v1/tasks/{task}/#")
        peer.subscribe(f"crowdfl/v1/tasks/{task}")
    device.subscribe("crowdfl/v1/ack/+/+")  # wider than its rights: only its own acks are delivered
    other.subscribe("crowdfl/v1/ack/+/+")

    # only the coordinator publishes tasks and rounds
    assert edge.publish_acked(task_topic(task), b"forged task") == 0
    assert device.publish_acked(round_topic(task), b"forged round") == 0
    assert coord.publish_acked(task_topic(task), b"task") == 0
    assert coord.publish_acked(round_topic(task), b"round") == 0
    for peer in (device, edge):
        got = {peer.messages.get(timeout=WAIT), peer.messages.get(timeout=WAIT)}
        assert got == {(task_topic(task), b"task"), (round_topic(task), b"round")}
    # an edge acknowledges only under its own id; a device reads only its own acks
    assert rogue.publish_acked(ack_topic(edge_id, device_id), b"forged ack") == 0
    assert coord.publish_acked(ack_topic(edge_id, device_id), b"coordinator ack") == 0
    assert edge.publish_acked(ack_topic(edge_id, other_device_id), b"ack-other") == 0
    assert edge.publish_acked(ack_topic(edge_id, device_id), b"ack") == 0
    assert drain(device, b"ack") == [(ack_topic(edge_id, device_id), b"ack")]
    assert drain(other, b"ack-other") == [(ack_topic(edge_id, other_device_id), b"ack-other")]
    # and an edge cannot publish features as if it were a device
    edge.subscribe(f"crowdfl/v1/feat/{edge_id}/#")
    assert rogue.publish_acked(feature_topic(edge_id, other_edge_id), b"edge as device") == 0
    assert device.publish_acked(feature_topic(edge_id, device_id), b"features") == 0
    assert drain(edge, b"features") == [(feature_topic(edge_id, device_id), b"features")]
    for peer in (device, other, edge):
        with pytest.raises(queue.Empty):
            peer.messages.get(timeout=SILENCE)
    assert broker.log_text().count(f"Denied PUBLISH from {rogue.client_id}") == 2


@pytest.mark.realpart
@pytest.mark.slow
@pytest.mark.parametrize("who", ["wrong-password", "unknown-user"])
def test_bad_login_is_refused(
    mosquitto_broker: MosquittoBroker, peers: list[Peer], who: str
) -> None:
    broker = mosquitto_broker
    creds = broker.add_device(uid("dev"))
    login = (
        (creds.username, "not-the-password")
        if who == "wrong-password"
        else (uid("nobody"), "x")
    )
    device = make_peer(peers, broker, "intruder", password_login=login)
    reason = device.connect(broker.host, broker.tls_port)
    assert reason is not None and reason.is_failure, reason
    assert reason.getName() == "Not authorized", reason  # MQTT 3.1.1 CONNACK 5


@pytest.mark.realpart
@pytest.mark.slow
def test_mutual_tls_identity_is_the_username(
    mosquitto_broker: MosquittoBroker, peers: list[Peer]
) -> None:
    broker = mosquitto_broker
    edge_id, device_id, victim_id = uid("edge"), uid("dev"), uid("dev")
    edge = connected_edge(peers, broker, edge_id)
    device = make_peer(
        peers, broker, device_id, cert=broker.add_device(device_id)
    )  # no password
    assert device.connect(broker.host, broker.mtls_port) == 0

    assert device.publish_acked(feature_topic(edge_id, victim_id), b"spoof") == 0
    assert device.publish_acked(feature_topic(edge_id, device_id), b"via-cert") == 0
    assert drain(edge, b"via-cert") == [
        (feature_topic(edge_id, device_id), b"via-cert")
    ]
    with pytest.raises(queue.Empty):
        edge.messages.get(timeout=SILENCE)


@pytest.mark.realpart
@pytest.mark.slow
def test_mutual_tls_without_client_cert_fails(
    mosquitto_broker: MosquittoBroker, peers: list[Peer]
) -> None:
    broker = mosquitto_broker
    device = make_peer(peers, broker, "no-cert")
    # TLS 1.3: the client may finish its side of the handshake before the server rejects the
    # missing certificate, so the failure shows up either in connect() or as no CONNACK.
    try:
        reason = device.connect(broker.host, broker.mtls_port)
    except (ssl.SSLError, OSError):
        reason = None
    assert reason is None, f"got a CONNACK without a client certificate: {reason}"
    assert "peer did not return a certificate" in broker.log_text()


# --- PostgreSQL ---------------------------------------------------------------------------


class _Base(DeclarativeBase):
    pass


class _Probe(_Base):
    __tablename__ = "harness_probe"
    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(sa.String(64), index=True)
    payload: Mapped[bytes] = mapped_column(sa.LargeBinary)


@pytest.mark.realpart
@pytest.mark.slow
def test_postgres_roundtrip_through_sqlalchemy(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database(uid("harness").replace("-", "_"))
    engine = sa.create_engine(url)
    try:
        _Base.metadata.create_all(engine)
        with Session(engine) as session, session.begin():
            session.add_all(
                [
                    _Probe(device_id="dev-1", payload=b"\x00\x01"),
                    _Probe(device_id="dev-2", payload=b"\xff"),
                ]
            )
        with Session(engine) as session:
            rows = session.scalars(sa.select(_Probe).order_by(_Probe.device_id)).all()
            assert [(r.device_id, r.payload) for r in rows] == [
                ("dev-1", b"\x00\x01"),
                ("dev-2", b"\xff"),
            ]
            server = session.execute(
                sa.text("select inet_server_addr()::text, version()")
            ).one()
            assert server[0] == "127.0.0.1/32" or server[0] == "127.0.0.1"
            assert server[1].startswith("PostgreSQL ")
    finally:
        engine.dispose()


@pytest.mark.realpart
@pytest.mark.slow
def test_postgres_requires_the_password(postgres_server: PostgresServer) -> None:
    bad = sa.create_engine(
        postgres_server.url.replace(postgres_server.password, "wrong")
    )
    try:
        with pytest.raises(
            sa.exc.OperationalError, match="password authentication failed"
        ):
            bad.connect()
    finally:
        bad.dispose()


@pytest.mark.realpart
@pytest.mark.slow
@pytest.mark.filterwarnings(
    "ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning"
)
def test_tls_listeners_require_tls_1_2(mosquitto_broker: MosquittoBroker) -> None:
    broker = mosquitto_broker
    for port in (broker.tls_port, broker.mtls_port):
        ctx = ssl.create_default_context(cafile=str(broker.ca_path))
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client itself offer TLS 1.1
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        with (
            socket.create_connection((broker.host, port), timeout=WAIT) as raw,
            pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"),
        ):
            ctx.wrap_socket(raw, server_hostname=broker.host)


def test_a_missing_package_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.realparts import require_module

    assert require_module("json", "stdlib").dumps([1]) == "[1]"
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no_such_pkg_for_crowdfl"):
        require_module("no_such_pkg_for_crowdfl", "pip install nothing")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_module("no_such_pkg_for_crowdfl", "pip install nothing")
