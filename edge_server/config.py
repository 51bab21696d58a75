"""The edge server's configuration (one TOML file, ``CROWDFL_EDGE__*`` environment overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from crowdfl.config import load_config
from crowdfl.mqtt import MqttSettings


@dataclass(frozen=True)
class CoordinatorSettings:
    url: str = "http://127.0.0.1:8470"
    sign_key: str = ""
    enc_key: str = ""


@dataclass(frozen=True)
class EdgeConfig:
    state_dir: Path = Path("/var/lib/crowdfl-edge")
    database_url: str = ""  # empty: SQLite file in state_dir; or postgresql+psycopg://...
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    coordinator: CoordinatorSettings = field(default_factory=CoordinatorSettings)
    drain_max: int = 500
    drain_wait_s: float = 0.05
    resubmit_every_s: float = 5.0
    seed: int = 0

    @property
    def key_file(self) -> Path:
        return self.state_dir / "identity.json"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'edge.sqlite'}"


def load(path: Path | None) -> EdgeConfig:
    return load_config(EdgeConfig, path, "CROWDFL_EDGE")
