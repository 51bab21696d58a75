"""MQTT plumbing shared by the agent and the edge server (paho-mqtt 2).

paho runs its network loop in a background thread; callbacks only hand raw (topic, payload)
pairs to a queue, and the role's own thread decodes and validates them. Topics:

    crowdfl/v1/tasks/<task_id>            TaskSpec, signed by the coordinator (retained)
    crowdfl/v1/tasks/<task_id>/round      RoundStart, signed by the coordinator (retained)
    crowdfl/v1/feat/<edge>/<device>       FeatureBatch, signed by the device, encrypted to the edge
    crowdfl/v1/ack/<edge>/<device>        Ack, signed by the edge

``<edge>`` and ``<device>`` are short ids (first 16 hex characters of the Ed25519 key), which are
also the MQTT user names, so broker ACLs (``pattern write crowdfl/v1/feat/+/%u`` for devices,
``crowdfl/v1/ack/<edge>/#`` for an edge) confine every participant to its own topics.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import paho.mqtt.client as mqtt

from .errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "crowdfl/v1"


def task_topic(task_id: str) -> str:
    return f"{PREFIX}/tasks/{task_id}"


def round_topic(task_id: str) -> str:
    return f"{PREFIX}/tasks/{task_id}/round"


def feature_topic(edge_short: str, device_short: str) -> str:
    return f"{PREFIX}/feat/{edge_short}/{device_short}"


def ack_topic(edge_short: str, device_short: str) -> str:
    return f"{PREFIX}/ack/{edge_short}/{device_short}"


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    password: str | None = None  # prefer password_file; this is for tests and env overrides
    keepalive: int = 30
    reconnect_min_s: int = 1
    reconnect_max_s: int = 60
    # a larger incoming message is skipped as it streams in (never held whole) and counted; the
    # largest envelope any role accepts is 32 MiB, plus room for the topic
    max_message_bytes: int = 32 * 1024 * 1024 + 65536


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    retain: bool


class _BoundedClient(mqtt.Client):
    """A paho client that never holds an incoming packet larger than ``max_packet_bytes``.

    paho reads a whole packet into memory before it looks at it, so a 100 MB publish cost 100 MB
    (and one ``recv`` of 100 MB). Here, once the packet's length is known to be too large, reads
    are capped at 64 KiB and everything past the first ``_KEEP`` bytes (topic and packet id) is
    thrown away as it arrives; the truncated message is then acknowledged (so the broker does not
    redeliver it) and dropped in :meth:`MqttLink._on_message`.
    """

    _KEEP = 2 + 65535 + 2  # topic length, the longest topic, packet id
    _CHUNK = 65536

    def __init__(self, *args: Any, max_packet_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_packet_bytes = max_packet_bytes
        self.discarding = False  # the packet being read is over the limit
        self.largest_held = 0  # bytes of one incoming packet ever held at once (for tests)

    def _sock_recv(self, bufsize: int) -> bytes:
        p = self._in_packet
        if p["command"] == 0:
            self.discarding = False  # a new packet starts
        elif p["have_remaining"] and p["remaining_length"] > self.max_packet_bytes:
            if not self.discarding:
                self.discarding = True
                log.warning("incoming MQTT packet of %d bytes exceeds %d: skipping it", p["remaining_length"], self.max_packet_bytes)
            if len(p["packet"]) > self._KEEP:
                del p["packet"][self._KEEP :]
            bufsize = min(bufsize, self._CHUNK)
        self.largest_held = max(self.largest_held, len(p["packet"]) + min(bufsize, p["to_process"] or bufsize))
        return super()._sock_recv(bufsize)


class MqttLink:
    """A paho client with automatic reconnect (exponential back-off) feeding a queue."""

    def __init__(self, settings: MqttSettings, client_id: str, subscriptions: list[str], max_queue: int = 100_000) -> None:
        self.settings = settings
        self.subscriptions = subscriptions
        self.inbox: queue.Queue[Incoming] = queue.Queue(maxsize=max_queue)
        self.connected = threading.Event()
        self.dropped = 0
        self.oversized = 0  # incoming messages over settings.max_message_bytes, skipped
        c = _BoundedClient(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, max_packet_bytes=settings.max_message_bytes
        )
        c.max_queued_messages_set(0)
        c.max_inflight_messages_set(100)
        if settings.username:
            c.username_pw_set(settings.username, self._password())
        if settings.tls:
            if settings.ca_file is None:
                raise ConfigError("tls", "mqtt.tls needs mqtt.ca_file")
            c.tls_set(
                ca_certs=str(settings.ca_file),
                certfile=str(settings.cert_file) if settings.cert_file else None,
                keyfile=str(settings.key_file) if settings.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        c.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c

    def _password(self) -> str | None:
        if self.settings.password_file is not None:
            try:
                return Path(self.settings.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError("password_file", f"cannot read {self.settings.password_file}: {exc}") from None
        if self.settings.password is None:
            # systemd LoadCredential=mqtt-password:... (the SD image delivers the device's password so)
            from .secrets import resolve_secret

            return resolve_secret("", None, "mqtt.password", "mqtt-password") or None
        return self.settings.password

    def start(self) -> None:
        self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: mqtt.ReasonCode, properties: object) -> None:
        if reason_code.is_failure:
            log.warning("MQTT connect to %s:%d refused: %s", self.settings.host, self.settings.port, reason_code)
            return
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        self.connected.set()
        log.info("MQTT connected to %s:%d", self.settings.host, self.settings.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason_code: mqtt.ReasonCode, properties: object) -> None:
        self.connected.clear()
        if reason_code != 0:
            log.warning("MQTT disconnected (%s); paho reconnects with back-off", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if isinstance(client, _BoundedClient) and client.discarding:
            self.oversized += 1
            log.error("dropped an MQTT message over %d bytes on %s (%d so far)", self.settings.max_message_bytes, msg.topic, self.oversized)
            return
        try:
            # block the network thread for a while: back-pressure to the broker beats dropping
            self.inbox.put(Incoming(msg.topic, bytes(msg.payload), bool(msg.retain)), timeout=10)
        except queue.Full:
            self.dropped += 1
            log.error(
                "MQTT inbox full; dropped a message on %s (%d so far; the sender resends until acknowledged)",
                msg.topic,
                self.dropped,
            )
