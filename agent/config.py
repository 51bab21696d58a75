"""The agent's configuration (one TOML file, ``CROWDFL_AGENT__*`` environment overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from crowdfl.config import load_config
from crowdfl.mqtt import MqttSettings


@dataclass(frozen=True)
class PeerSettings:
    """A server this device trusts, as provisioned by the manufacturer."""

    sign_key: str = ""  # hex Ed25519 public key
    enc_key: str = ""  # hex X25519 public key (edge only: features are encrypted to it)
    url: str = ""  # coordinator only: where artifacts are fetched


@dataclass(frozen=True)
class PrivacySettings:
    max_epsilon: float = 8.0
    require_label_privacy: bool = False


@dataclass(frozen=True)
class LogSettings:
    retention_days: float = 120.0
    max_rows: int = 2_000_000


@dataclass(frozen=True)
class SourceSettings:
    kind: str = "simulated"  # simulated | jsonl (tasmota/shelly MQTT: see agent.sources)
    seed: int = 0
    interval_s: int = 900
    path: Path | None = None


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path = Path("/var/lib/crowdfl-agent")
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    edge: PeerSettings = field(default_factory=PeerSettings)
    coordinator: PeerSettings = field(default_factory=PeerSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    log: LogSettings = field(default_factory=LogSettings)
    source: SourceSettings = field(default_factory=SourceSettings)
    max_spool_mb: float = 64.0
    resend_after_s: float = 30.0

    @property
    def key_file(self) -> Path:
        return self.state_dir / "identity.json"


def load(path: Path | None) -> AgentConfig:
    return load_config(AgentConfig, path, "CROWDFL_AGENT")
