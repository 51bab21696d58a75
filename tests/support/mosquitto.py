"""A throwaway Debian ``mosquitto`` with TLS, per-device credentials and ACLs.

Listeners (all on 127.0.0.1, free ports):

* ``tls_port``   TLS 1.2+ and username/password (``password_file`` with mosquitto's $7$ hashes).
* ``mtls_port``  mutual TLS, ``require_certificate`` + ``use_identity_as_username``: the
  certificate CN is the MQTT username, so the same ACL applies.
* ``plain_port`` optional, no TLS but username/password + ACL, for raw-throughput benchmarks.

The configuration, password file and ACL are written by ``edge_server/broker_config.py`` (what
``crowdfl-edge broker-config`` writes for an operator), so every test here checks the shipped
broker configuration. Topic layout and ACL: exactly the topics of ``crowdfl/mqtt.py`` (``username`` = the node's short
id for devices, edges and the coordinator; ids must not overlap). Every rule is per user (no
``pattern`` lines), so an edge or the coordinator never inherits a device's rights, and a client
whose certificate CN has no account gets no rights at all:

* device ``D``: write ``crowdfl/v1/feat/+/D``; read ``crowdfl/v1/tasks/#`` and
  ``crowdfl/v1/ack/+/D`` (its acks come on ``crowdfl/v1/ack/<edge>/D``)
* edge ``E``: read ``crowdfl/v1/feat/E/#`` and ``crowdfl/v1/tasks/#``; write ``crowdfl/v1/ack/E/#``
* coordinator ``C``: write ``crowdfl/v1/tasks/#`` (``tasks/<task_id>`` and ``tasks/<task_id>/round``)
* other accounts (e.g. a home's smart plugs and the agent reading them): the topics given to
  :meth:`MosquittoBroker.add_user`

Mosquitto 2.0 denies silently: a forbidden publish is still PUBACKed and then dropped, and a
subscription outside the client's "read" rights is granted (SUBACK QoS 1) but matching messages
are never delivered. With ``debug_log`` (``log_type all``) the broker logs
``Denied PUBLISH from <client id> ...``; :meth:`MosquittoBroker.log_text` returns the log.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.realparts import (
    find_executable,
    free_ports,
    require_real_part,
    run_checked,
    stop_process,
    wait_for_ports,
)

HOST = "127.0.0.1"
TOPIC_ROOT = "crowdfl/v1"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_CERT_DAYS = "2"
_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def feature_topic(edge_id: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/feat/{edge_id}/{device_id}"


def task_topic(task_id: str) -> str:
    return f"{TOPIC_ROOT}/tasks/{task_id}"


def round_topic(task_id: str) -> str:
    return f"{TOPIC_ROOT}/tasks/{task_id}/round"


def ack_topic(edge_id: str, device_id: str) -> str:
    return f"{TOPIC_ROOT}/ack/{edge_id}/{device_id}"


@dataclass(frozen=True)
class MqttCredentials:
    """What a client needs: username/password for ``tls_port``, cert/key for ``mtls_port``."""

    username: str
    password: str
    certfile: Path
    keyfile: Path


@dataclass(frozen=True)
class _Tools:
    mosquitto: str
    mosquitto_passwd: str
    openssl: str


def find_tools() -> tuple[_Tools | None, str]:
    """The binaries the harness needs, or ``None`` and why not."""
    found = {
        name: find_executable(name)
        for name in ("mosquitto", "mosquitto_passwd", "openssl")
    }
    missing = [name for name, path in found.items() if path is None]
    if missing:
        return None, (
            f"{', '.join(missing)} not found on PATH or /usr/sbin "
            "(apt-get install mosquitto mosquitto-clients openssl; see .ci/install-system.sh)"
        )
    return _Tools(**{k: str(v) for k, v in found.items()}), ""


class _Pki:
    """A test CA made with the openssl CLI (``cryptography`` is not in the venv)."""

    def __init__(self, folder: Path, openssl: str) -> None:
        self.folder = folder
        self.openssl = openssl
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_cert = folder / "ca.crt"
        self.ca_key = folder / "ca.key"
        run_checked(
            [
                openssl,
                "req",
                "-x509",
                *_EC_KEY,
                "-keyout",
                str(self.ca_key),
                "-out",
                str(self.ca_cert),
                "-days",
                _CERT_DAYS,
                "-subj",
                "/CN=crowdfl-test-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]
        )
        self.ca_key.chmod(0o600)

    def issue(self, name: str, common_name: str, extensions: str) -> tuple[Path, Path]:
        key, csr, cert = (
            self.folder / f"{name}.{ext}" for ext in ("key", "csr", "crt")
        )
        ext_file = self.folder / f"{name}.ext"
        ext_file.write_text(extensions)
        run_checked(
            [
                self.openssl,
                "req",
                "-new",
                *_EC_KEY,
                "-keyout",
                str(key),
                "-out",
                str(csr),
                "-subj",
                f"/CN={common_name}",
            ]
        )
        run_checked(
            [
                self.openssl,
                "x509",
                "-req",
                "-in",
                str(csr),
                "-CA",
                str(self.ca_cert),
                "-CAkey",
                str(self.ca_key),
                "-set_serial",
                str(secrets.randbits(63)),
                "-days",
                _CERT_DAYS,
                "-sha256",
                "-extfile",
                str(ext_file),
                "-out",
                str(cert),
            ]
        )
        key.chmod(0o600)
        csr.unlink()
        ext_file.unlink()
        return cert, key

    def server(self) -> tuple[Path, Path]:
        return self.issue(
            "server",
            "localhost",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )

    def client(self, common_name: str) -> tuple[Path, Path]:
        return self.issue(
            f"client-{common_name}",
            common_name,
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
        )


@dataclass
class MosquittoBroker:
    """A running broker; add devices and edges at any time (the broker reloads on SIGHUP)."""

    host: str
    tls_port: int
    mtls_port: int
    plain_port: int | None
    ca_path: Path
    workdir: Path
    log_path: Path
    debug_log: bool
    _tools: _Tools = field(repr=False)
    _pki: _Pki = field(repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _devices: dict[str, MqttCredentials] = field(default_factory=dict, repr=False)
    _edges: dict[str, MqttCredentials] = field(default_factory=dict, repr=False)
    _coordinators: dict[str, MqttCredentials] = field(default_factory=dict, repr=False)
    _others: dict[str, tuple[MqttCredentials, tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict, repr=False)
    _passwords: dict[str, str] = field(default_factory=dict, repr=False)
    message_size_limit: int = 1024 * 1024

    @property
    def password_file(self) -> Path:
        return self.workdir / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.workdir / "acl"

    @property
    def config_file(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def add_device(
        self, device_id: str, password: str | None = None
    ) -> MqttCredentials:
        """A device account: password entry + client cert with CN = device id."""
        self._check_new_id(device_id)
        creds = self._add_user(device_id, password)
        self._devices[device_id] = creds
        self._write_acl()
        self._apply()
        return creds

    def add_edge(self, edge_id: str, password: str | None = None) -> MqttCredentials:
        """An edge-server account that reads ``crowdfl/v1/feat/<edge_id>/#``."""
        self._check_new_id(edge_id)
        creds = self._add_user(edge_id, password)
        self._edges[edge_id] = creds
        self._write_acl()
        self._apply()
        return creds

    def add_coordinator(self, coordinator_id: str, password: str | None = None) -> MqttCredentials:
        """The coordinator's account: it publishes (retained) ``crowdfl/v1/tasks/#``."""
        self._check_new_id(coordinator_id)
        creds = self._add_user(coordinator_id, password)
        self._coordinators[coordinator_id] = creds
        self._write_acl()
        self._apply()
        return creds

    def add_user(
        self,
        username: str,
        *,
        read: Iterable[str] = (),
        write: Iterable[str] = (),
        password: str | None = None,
    ) -> MqttCredentials:
        """An account outside crowdfl's roles with exactly these topic filters (e.g. smart plugs)."""
        self._check_new_id(username)
        read, write = tuple(read), tuple(write)
        for topic in read + write:
            if not topic or any(c.isspace() for c in topic):
                raise ValueError(f"invalid ACL topic {topic!r}")
        creds = self._add_user(username, password)
        self._others[username] = (creds, read, write)
        self._write_acl()
        self._apply()
        return creds

    def credentials(self, username: str) -> MqttCredentials:
        """Credentials of an account added earlier (e.g. via ``running_mosquitto(devices=...)``)."""
        found = (
            self._devices.get(username)
            or self._edges.get(username)
            or self._coordinators.get(username)
            or (self._others[username][0] if username in self._others else None)
        )
        if found is None:
            raise KeyError(username)
        return found

    def client_cert(self, common_name: str) -> tuple[Path, Path]:
        """A CA-signed client cert with no password entry (e.g. for an unknown CN)."""
        return self._pki.client(common_name)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill9(self) -> None:
        """Crash the broker (SIGKILL): every connection drops, nothing is flushed."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def restart(self, timeout: float = 10.0) -> None:
        """Start the broker again on the same ports, accounts and ACL (after :meth:`kill9`).
        There is no persistence file: retained and queued messages died with the old process."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("mosquitto is still running")
        with self.log_path.open("ab") as log:
            log.write(b"--- restarted by the test ---\n")
        self._start(timeout)

    def _check_new_id(self, ident: str) -> None:
        if not _ID_RE.match(ident):
            # '+', '#' and '/' would also make mosquitto skip %u patterns for that user.
            raise ValueError(f"invalid MQTT user id {ident!r}")
        if ident in self._devices or ident in self._edges or ident in self._coordinators or ident in self._others:
            raise ValueError(f"user id {ident!r} already exists")

    def _add_user(self, username: str, password: str | None) -> MqttCredentials:
        password = password or secrets.token_urlsafe(18)
        self._passwords[username] = password
        cert, key = self._pki.client(username)
        return MqttCredentials(username, password, cert, key)

    def _plan(self):  # type: ignore[no-untyped-def]
        """The broker as ``crowdfl-edge broker-config`` describes it (imported here: the agent-only
        test venvs load this plugin too and have no edge server)."""
        from edge_server.broker_config import BrokerPlan, ExtraAccount, Listener

        return BrokerPlan(
            cafile=self.ca_path,
            certfile=self._pki.folder / "server.crt",
            keyfile=self._pki.folder / "server.key",
            password_file=self.password_file,
            acl_file=self.acl_file,
            listeners=(Listener(self.tls_port, self.host), Listener(self.mtls_port, self.host, client_certificates=True)),
            plain_listener=Listener(self.plain_port, self.host) if self.plain_port is not None else None,
            devices=tuple(self._devices),
            edges=tuple(self._edges),
            coordinators=tuple(self._coordinators),
            extra=tuple(ExtraAccount(name, read, write) for name, (_, read, write) in self._others.items()),
            persistence_dir=None,
            # Run as root, mosquitto drops to user 'mosquitto', which cannot read our 0600 files.
            run_as="root" if os.geteuid() == 0 else None,
            log_dest="stderr",
            # Debug level logs every packet (and ACL denials); switch it off for benchmarks.
            log_types=("all",) if self.debug_log else ("error", "warning", "notice", "information"),
            max_queued_messages=100_000,
            message_size_limit=self.message_size_limit,
        )

    def _write_acl(self) -> None:
        from edge_server.broker_config import write_broker_files

        write_broker_files(self._plan(), self._passwords, self.config_file)

    def _write_config(self) -> None:
        self._write_acl()

    def _start(self, timeout: float) -> None:
        self._write_config()
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                [self._tools.mosquitto, "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        finally:
            log.close()
        ports = [self.tls_port, self.mtls_port] + (
            [self.plain_port] if self.plain_port else []
        )
        try:
            wait_for_ports(self.host, ports, timeout, self._proc)
        except (RuntimeError, TimeoutError) as exc:
            self._stop()
            raise RuntimeError(
                f"mosquitto did not start: {exc}\n--- broker log ---\n{self.log_text()}"
            ) from exc

    def _apply(self, timeout: float = 5.0) -> None:
        """Make a running broker re-read password and ACL files, and wait until it has."""
        if self._proc is None or self._proc.poll() is not None:
            return
        before = self.log_text().count("Reloading config")
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        # The reload runs to completion in the broker's single-threaded main loop right after
        # it logs this line, so any connection made afterwards sees the new files.
        while self.log_text().count("Reloading config") <= before:
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto did not reload\n--- broker log ---\n{self.log_text()}"
                )
            time.sleep(0.01)

    def _stop(self) -> int | None:
        """Stop the broker; return its exit code if it had already died on its own."""
        if self._proc is None:
            return None
        died_early = self._proc.poll()
        stop_process(self._proc)
        return died_early


def _make_broker(
    workdir: Path, tools: _Tools, plain_listener: bool, debug_log: bool
) -> MosquittoBroker:
    pki = _Pki(workdir / "pki", tools.openssl)
    pki.server()
    ports = free_ports(3 if plain_listener else 2)
    return MosquittoBroker(
        host=HOST,
        tls_port=ports[0],
        mtls_port=ports[1],
        plain_port=ports[2] if plain_listener else None,
        ca_path=pki.ca_cert,
        workdir=workdir,
        log_path=workdir / "mosquitto.log",
        debug_log=debug_log,
        _tools=tools,
        _pki=pki,
    )


@contextmanager
def running_mosquitto(
    workdir: Path,
    *,
    devices: Iterable[str] = (),
    edges: Iterable[str] = (),
    plain_listener: bool = False,
    debug_log: bool = True,
    start_timeout: float = 10.0,
    attempts: int = 3,
    message_size_limit: int = 1024 * 1024,
) -> Iterator[MosquittoBroker]:
    """Start a broker in ``workdir`` and stop it on exit; raises if the tools are missing.

    Credentials for ``devices``/``edges`` are made before start (no reload needed); look them
    up with :meth:`MosquittoBroker.credentials`. ``add_device``/``add_edge`` work while it runs.
    """
    tools, why = find_tools()
    if tools is None:
        raise RuntimeError(why)
    workdir.mkdir(parents=True, exist_ok=True)
    broker = _make_broker(workdir, tools, plain_listener, debug_log)
    broker.message_size_limit = message_size_limit
    for edge in edges:
        broker.add_edge(edge)
    for device in devices:
        broker.add_device(device)
    for attempt in range(attempts):
        try:
            broker._start(start_timeout)
            break
        except RuntimeError:
            # Most likely a port was taken between free_ports() and bind(): pick new ones.
            if attempt == attempts - 1:
                raise
            ports = free_ports(3)
            broker.tls_port, broker.mtls_port = ports[0], ports[1]
            if broker.plain_port is not None:
                broker.plain_port = ports[2]
    try:
        yield broker
    finally:
        died_early = broker._stop()
        if died_early is not None:
            raise RuntimeError(
                f"mosquitto exited on its own with code {died_early}\n--- broker log ---\n{broker.log_text()}"
            )


@pytest.fixture(scope="module")
def mosquitto_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MosquittoBroker]:
    """One broker per test module; tests add their own devices/edges (ids must be unique)."""
    tools, why = find_tools()
    require_real_part("mosquitto", tools is not None, why)
    with running_mosquitto(
        tmp_path_factory.mktemp("mosquitto"), plain_listener=True
    ) as broker:
        yield broker
