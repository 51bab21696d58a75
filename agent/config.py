"""The agent's configuration (one TOML file, ``CROWDFL_AGENT__*`` environment overrides)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from crowdfl.config import load_config
from crowdfl.devices import DEVICE_KINDS
from crowdfl.mqtt import MqttSettings

from .privacy import DEFAULT_MAX_EPSILON_PER_DAY, DEFAULT_MAX_EPSILON_PER_HOUR

PLUG_FIRMWARES = ("tasmota", "shelly_gen1", "shelly_gen2")


@dataclass(frozen=True)
class PeerSettings:
    """A server this device trusts, as provisioned by the manufacturer."""

    sign_key: str = ""  # hex Ed25519 public key
    enc_key: str = ""  # hex X25519 public key (edge only: features are encrypted to it)
    url: str = ""  # coordinator only: where artifacts are fetched


@dataclass(frozen=True)
class PrivacySettings:
    max_epsilon: float = 8.0  # per sample, features and labels together
    require_label_privacy: bool = False
    # caps on the budget one hour / one UTC day of the usage log may carry over every release of
    # every task (agent.privacy.sample_spend); on by default (agent.privacy says why these values);
    # 0 = no cap (the spend is still accounted and shown)
    max_epsilon_per_hour: float = DEFAULT_MAX_EPSILON_PER_HOUR
    max_epsilon_per_day: float = DEFAULT_MAX_EPSILON_PER_DAY

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ValueError(f"privacy.max_epsilon must be a positive finite number, got {self.max_epsilon}")
        for name in ("max_epsilon_per_hour", "max_epsilon_per_day"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"privacy.{name} must be a finite number >= 0 (0: no cap), got {v}")


@dataclass(frozen=True)
class LogSettings:
    retention_days: float = 120.0
    max_rows: int = 2_000_000


@dataclass(frozen=True)
class SourceSettings:
    kind: str = "simulated"  # simulated | jsonl | none ([[plugs]] add live Tasmota/Shelly telemetry)
    seed: int = 0
    interval_s: int = 900
    path: Path | None = None
    poll_s: float = 5.0  # how often the sources are drained into the usage log

    def __post_init__(self) -> None:
        if self.kind not in ("simulated", "jsonl", "none"):
            raise ValueError(f"source.kind must be simulated, jsonl or none, got {self.kind!r}")
        if not 0.05 <= self.poll_s <= 3600:
            raise ValueError(f"source.poll_s must be in [0.05, 3600], got {self.poll_s}")


@dataclass(frozen=True)
class PlugSettings:
    """One smart plug on the home's MQTT broker and the device kind it powers (``[[plugs]]``).

    ``topic`` is the Tasmota ``%topic%`` (``tele/<topic>/SENSOR``), the Shelly Gen1 device id
    (``shellies/<topic>/relay/<channel>/...``) or the Shelly Gen2+ topic prefix
    (``<topic>/status/switch:<channel>``).
    """

    topic: str
    kind: str
    firmware: str = "tasmota"  # tasmota | shelly_gen1 | shelly_gen2
    channel: int = 0  # Shelly relay/switch index
    device_id: str = ""  # the name in the usage log; default "<firmware>:<topic>"

    def __post_init__(self) -> None:
        if self.firmware not in PLUG_FIRMWARES:
            raise ValueError(f"plug {self.topic!r}: firmware must be one of {', '.join(PLUG_FIRMWARES)}, got {self.firmware!r}")
        if self.kind not in DEVICE_KINDS:
            raise ValueError(f"plug {self.topic!r}: kind must be one of {', '.join(DEVICE_KINDS)}, got {self.kind!r}")
        if not self.topic or len(self.topic) > 128 or any(c in self.topic for c in "+#\x00") or self.topic.strip("/") != self.topic:
            raise ValueError(f"plug topic {self.topic!r} must be 1..128 characters without MQTT wildcards or leading/trailing '/'")
        if self.firmware != "shelly_gen2" and "/" in self.topic:
            raise ValueError(f"plug topic {self.topic!r}: a {self.firmware} topic is one level (no '/')")
        if not 0 <= self.channel < 16:
            raise ValueError(f"plug {self.topic!r}: channel must be in 0..15, got {self.channel}")
        if len(self.device_id) > 128:
            raise ValueError(f"plug {self.topic!r}: device_id longer than 128 characters")

    @property
    def log_id(self) -> str:
        return self.device_id or f"{self.firmware}:{self.topic}"


@dataclass(frozen=True)
class ChainSettings:
    """The device's own view of the chain for ``crowdfl-agent verify``: a JSON-RPC URL the owner
    chooses (not necessarily the manufacturer's) and the contracts' addresses."""

    rpc_url: str = ""
    tasks_address: str = ""  # CrowdTasks
    registry_address: str = ""


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path = Path("/var/lib/crowdfl-agent")
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    edge: PeerSettings = field(default_factory=PeerSettings)
    coordinator: PeerSettings = field(default_factory=PeerSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    log: LogSettings = field(default_factory=LogSettings)
    source: SourceSettings = field(default_factory=SourceSettings)
    plug_mqtt: MqttSettings = field(default_factory=MqttSettings)  # the home's broker, where the plugs publish
    plugs: tuple[PlugSettings, ...] = ()
    chain: ChainSettings = field(default_factory=ChainSettings)
    max_spool_mb: float = 64.0
    resend_after_s: float = 30.0
    # how often a selected round that released nothing yet (no fresh sample, a full disk) is retried
    retry_every_s: float = 30.0
    shutdown_grace_s: float = 5.0  # on SIGTERM: how long to wait for the edge to acknowledge the spool
    metrics_port: int = 0  # Prometheus /metrics on 127.0.0.1:<port>; 0 = off

    def __post_init__(self) -> None:
        seen: dict[tuple[str, str, int], str] = {}
        ids: set[str] = set()
        for p in self.plugs:
            key = (p.firmware, p.topic, p.channel)
            if key in seen:
                raise ValueError(f"plugs: {p.firmware} topic {p.topic!r} channel {p.channel} is configured twice")
            seen[key] = p.kind
            if p.log_id in ids:
                raise ValueError(f"plugs: device_id {p.log_id!r} is used twice")
            ids.add(p.log_id)
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be 0 (off) or a TCP port")
        if not 0 < self.retry_every_s <= 3600:
            raise ValueError("retry_every_s must be in (0, 3600]")
        if not 0 <= self.shutdown_grace_s <= 25:
            raise ValueError("shutdown_grace_s must be in [0, 25] (systemd stops the unit after 30 s)")

    @property
    def key_file(self) -> Path:
        return self.state_dir / "identity.json"


def load(path: Path | None) -> AgentConfig:
    return load_config(AgentConfig, path, "CROWDFL_AGENT")
