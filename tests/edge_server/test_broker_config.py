"""``crowdfl-edge broker-config``: the mosquitto files an operator runs, checked as text and on a real broker."""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import secrets
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from crowdfl.identity import Identity, short_id
from edge_server.broker_config import (
    BrokerConfigError,
    BrokerPlan,
    ExtraAccount,
    hash_password,
    load_or_create_passwords,
    render_acl,
    render_config,
)
from edge_server.cli import main as edge_main
from tests.support.mosquitto import _Pki, find_tools
from tests.support.realparts import free_ports, require_real_part, stop_process, wait_for_ports

WAIT = 10.0


def _plan(**kw: object) -> BrokerPlan:
    base: dict[str, object] = dict(cafile=Path("/c/ca.crt"), certfile=Path("/c/s.crt"), keyfile=Path("/c/s.key"),
                                   password_file=Path("/b/passwd"), acl_file=Path("/b/acl"))
    base.update(kw)
    return BrokerPlan(**base)  # type: ignore[arg-type]


def test_acl_confines_every_role_to_its_own_topics() -> None:
    acl = render_acl(_plan(devices=("dev1",), edges=("edge1",), coordinators=("coord",),
                           extra=(ExtraAccount("plugs", write=("tele/+/SENSOR",)),)))
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in acl.split("\n\n")[1:]}
    assert blocks["user dev1"] == ["topic write crowdfl/v1/feat/+/dev1", "topic read crowdfl/v1/tasks/#",
                                   "topic read crowdfl/v1/ack/+/dev1"]
    assert blocks["user edge1"] == ["topic read crowdfl/v1/feat/edge1/#", "topic read crowdfl/v1/tasks/#",
                                    "topic write crowdfl/v1/ack/edge1/#"]
    assert blocks["user coord"] == ["topic write crowdfl/v1/tasks/#"]
    assert blocks["user plugs"] == ["topic write tele/+/SENSOR"]
    assert not any(line.startswith("pattern") for line in acl.splitlines())


def test_config_has_tls_limits_and_persistence() -> None:
    conf = render_config(_plan(message_size_limit=4096, persistence_dir=Path("/var/lib/mosquitto")))
    lines = conf.splitlines()
    assert "message_size_limit 4096" in lines and "persistence true" in lines
    assert "persistence_location /var/lib/mosquitto/" in lines
    assert lines.count("allow_anonymous false") == 2 and lines.count("tls_version tlsv1.2") == 2
    assert "require_certificate true" in lines and "use_identity_as_username true" in lines
    assert "persistence false" in render_config(_plan(persistence_dir=None)).splitlines()


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "with space", "", "x" * 65])
def test_bad_user_names_are_refused(bad: str) -> None:
    with pytest.raises(BrokerConfigError):
        _plan(devices=(bad,))


def test_duplicate_user_names_are_refused() -> None:
    with pytest.raises(BrokerConfigError, match="twice"):
        _plan(devices=("a1",), edges=("a1",))


def test_password_hash_is_mosquittos_pbkdf2_sha512() -> None:
    salt = b"0123456789ab"
    h = hash_password("s3cret", salt)
    _, kind, iterations, salt_b64, digest_b64 = h.split("$")
    assert (kind, iterations, base64.b64decode(salt_b64)) == ("7", "101", salt)
    assert base64.b64decode(digest_b64) == hashlib.pbkdf2_hmac("sha512", b"s3cret", salt, 101)


def test_passwords_persist_across_runs(tmp_path: Path) -> None:
    first = load_or_create_passwords(tmp_path, ["a1", "b2"])
    again = load_or_create_passwords(tmp_path, ["a1", "b2", "c3"])
    assert again["a1"] == first["a1"] and again["b2"] == first["b2"] and len(again["c3"]) >= 24
    assert (tmp_path / "c3.password").stat().st_mode & 0o077 == 0


def _edge_with_devices(tmp_path: Path, n_devices: int) -> tuple[Path, list[str], str]:
    coordinator = Identity.generate()
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n[coordinator]\nsign_key = "{coordinator.public.to_json()["sign_key"]}"\n')
    assert edge_main(["provision", "--config", str(cfg)]) == 0
    devices = []
    for _ in range(n_devices):
        dev = Identity.generate()
        assert edge_main(["register-device", dev.node_id, dev.public.to_json()["enc_key"], "--config", str(cfg)]) == 0
        devices.append(short_id(dev.node_id))
    return cfg, devices, short_id(coordinator.node_id)


def test_cli_writes_files_for_registered_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, devices, coord = _edge_with_devices(tmp_path, 2)
    capsys.readouterr()
    out = tmp_path / "broker"
    assert edge_main(["broker-config", "--config", str(cfg), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(report["devices"]) == sorted(devices) and report["coordinators"] == [coord]
    acl = (out / "acl").read_text()
    for d in devices:
        assert f"user {d}\ntopic write crowdfl/v1/feat/+/{d}\n" in acl
    users = [line.split(":")[0] for line in (out / "passwd").read_text().splitlines()]
    assert sorted(users) == sorted([*devices, report["edge"], coord])
    for f in ("acl", "passwd", "mosquitto.conf"):
        assert (out / f).stat().st_mode & 0o077 == 0


def test_cli_needs_a_provisioned_edge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    assert edge_main(["broker-config", "--config", str(cfg), "--out", str(tmp_path / "b")]) == 2
    assert "crowdfl-edge provision" in capsys.readouterr().err


class _Peer:
    def __init__(self, ca: Path, port: int, user: str | None = None, password: str | None = None,
                 cert: tuple[Path, Path] | None = None) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connacks: queue.Queue[object] = queue.Queue()
        self.subacks: queue.Queue[object] = queue.Queue()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311)
        c.reconnect_delay_set(30, 30)
        c.tls_set(ca_certs=str(ca), certfile=str(cert[0]) if cert else None, keyfile=str(cert[1]) if cert else None,
                  tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if user:
            c.username_pw_set(user, password)
        c.on_connect = lambda _c, _u, _f, rc, _p: self.connacks.put(rc)
        c.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.put(rcs)
        c.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, bytes(msg.payload)))
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c
        self.rc = self.connacks.get(timeout=WAIT)

    def sub(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        self.subacks.get(timeout=WAIT)

    def pub(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=WAIT)

    def until(self, payload: bytes) -> list[tuple[str, bytes]]:
        got = []
        while True:
            msg = self.messages.get(timeout=WAIT)
            got.append(msg)
            if msg[1] == payload:
                return got

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def generated_broker(tmp_path: Path) -> Iterator[dict[str, object]]:
    tools, why = find_tools()
    require_real_part("mosquitto", tools is not None, why)
    assert tools is not None
    cfg, devices, coord = _edge_with_devices(tmp_path, 2)
    pki = _Pki(tmp_path / "pki", tools.openssl)
    pki.server()
    tls_port, mtls_port = free_ports(2)
    out = tmp_path / "broker"
    assert edge_main([
        "broker-config", "--config", str(cfg), "--out", str(out), "--bind", "127.0.0.1",
        "--port", str(tls_port), "--mtls-port", str(mtls_port), "--cafile", str(pki.ca_cert),
        "--certfile", str(pki.folder / "server.crt"), "--keyfile", str(pki.folder / "server.key"),
        "--message-size-limit", "4096", "--persistence-dir", str(tmp_path / "persist"), "--run-as", "root",
    ]) == 0
    (tmp_path / "persist").mkdir()
    edge = short_id(Identity.load(tmp_path / "state" / "identity.json").node_id)
    state: dict[str, object] = {"procs": []}

    def start() -> None:
        log = (tmp_path / "mosquitto.log").open("ab")
        proc = subprocess.Popen([tools.mosquitto, "-c", str(out / "mosquitto.conf")], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        state["proc"] = proc
        wait_for_ports("127.0.0.1", [tls_port, mtls_port], 10.0, proc)

    def stop() -> None:
        proc = state.get("proc")
        if isinstance(proc, subprocess.Popen):
            stop_process(proc)
            state["proc"] = None

    start()
    pw = {u: (out / "credentials" / f"{u}.password").read_text().strip() for u in [*devices, edge, coord]}
    state.update(devices=devices, edge=edge, coord=coord, pw=pw, pki=pki, tls=tls_port, mtls=mtls_port,
                 start=start, stop=stop)
    peers: list[_Peer] = []
    state["peers"] = peers
    try:
        yield state
    finally:
        for p in peers:
            p.stop()
        stop()


@pytest.mark.realpart
def test_generated_config_runs_mosquitto_with_per_device_rights(generated_broker: dict[str, object]) -> None:
    b = generated_broker
    a, other = b["devices"]  # type: ignore[misc]
    edge, pw, ca = b["edge"], b["pw"], b["pki"].ca_cert  # type: ignore[attr-defined]
    peers: list[_Peer] = b["peers"]  # type: ignore[assignment]

    def peer(*args: object, **kw: object) -> _Peer:
        p = _Peer(ca, *args, **kw)  # type: ignore[arg-type]
        peers.append(p)
        return p

    wrong = peer(b["tls"], a, "not-the-password")
    assert wrong.rc is not None and wrong.rc.is_failure  # type: ignore[attr-defined]

    edge_peer = peer(b["tls"], edge, pw[edge])  # type: ignore[index]
    edge_peer.sub(f"crowdfl/v1/feat/{edge}/#")
    dev = peer(b["tls"], a, pw[a])  # type: ignore[index]
    dev.sub("crowdfl/v1/ack/#")  # granted, but only its own acknowledgements are delivered
    dev.pub(f"crowdfl/v1/feat/{edge}/{other}", b"spoofed")  # another device's topic: dropped
    dev.pub(f"crowdfl/v1/feat/{edge}/{a}", b"x" * 5000)  # above message_size_limit: dropped
    dev.pub(f"crowdfl/v1/feat/{edge}/{a}", b"own")
    assert edge_peer.until(b"own") == [(f"crowdfl/v1/feat/{edge}/{a}", b"own")]

    edge_peer.pub(f"crowdfl/v1/ack/{edge}/{other}", b"ack-other")
    edge_peer.pub(f"crowdfl/v1/ack/{edge}/{a}", b"ack-own")
    assert dev.until(b"ack-own") == [(f"crowdfl/v1/ack/{edge}/{a}", b"ack-own")]

    # client certificates: CN = user name on the mutual-TLS listener, same ACL
    cert = b["pki"].client(other)  # type: ignore[attr-defined]
    by_cert = peer(b["mtls"], cert=cert)
    assert not by_cert.rc.is_failure  # type: ignore[attr-defined]
    by_cert.pub(f"crowdfl/v1/feat/{edge}/{a}", b"spoofed-by-cert")
    by_cert.pub(f"crowdfl/v1/feat/{edge}/{other}", b"own-by-cert")
    assert edge_peer.until(b"own-by-cert") == [(f"crowdfl/v1/feat/{edge}/{other}", b"own-by-cert")]


@pytest.mark.realpart
def test_retained_tasks_survive_a_broker_restart(generated_broker: dict[str, object]) -> None:
    b = generated_broker
    coord, pw, ca, edge = b["coord"], b["pw"], b["pki"].ca_cert, b["edge"]  # type: ignore[attr-defined]
    task = secrets.token_hex(8)
    c = _Peer(ca, b["tls"], coord, pw[coord])  # type: ignore[index, arg-type]
    c.pub(f"crowdfl/v1/tasks/{task}", b"spec", retain=True)
    c.stop()
    b["stop"]()  # type: ignore[operator]
    b["start"]()  # type: ignore[operator]
    e = _Peer(ca, b["tls"], edge, pw[edge])  # type: ignore[index, arg-type]
    b["peers"].append(e)  # type: ignore[attr-defined]
    e.sub("crowdfl/v1/tasks/#")
    assert e.until(b"spec") == [(f"crowdfl/v1/tasks/{task}", b"spec")]
