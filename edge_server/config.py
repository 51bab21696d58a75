"""The edge server's configuration (one TOML file, ``CROWDFL_EDGE__*`` environment overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from crowdfl.config import load_config
from crowdfl.mqtt import MqttSettings
from crowdfl.secrets import resolve_secret
from crowdfl.serving import HttpLimits


@dataclass(frozen=True)
class CoordinatorSettings:
    url: str = "http://127.0.0.1:8470"
    sign_key: str = ""
    enc_key: str = ""


# /healthz and /metrics take no body; a scraper needs few connections
EDGE_HTTP_LIMITS = HttpLimits(max_body_bytes=64 * 1024, max_header_bytes=16 * 1024, idle_timeout_s=30, max_connections=20, threads=2)


@dataclass(frozen=True)
class HttpSettings:
    """The /healthz and /metrics endpoint; loopback by default (scraped on the host)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8471
    limits: HttpLimits = field(default_factory=lambda: EDGE_HTTP_LIMITS)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"http.port {self.port} is not a TCP port")


@dataclass(frozen=True)
class EdgeConfig:
    state_dir: Path = Path("/var/lib/crowdfl-edge")
    database_url: str = ""  # empty: SQLite file in state_dir; or postgresql+psycopg://...
    database_url_file: Path | None = None  # the URL (with its password) from a 0600 file, else the credential "database-url"
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    coordinator: CoordinatorSettings = field(default_factory=CoordinatorSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    drain_max: int = 500
    # processes that verify and decrypt feature batches (0: in the ingest thread). They pay off only
    # with idle cores: on the shared 2-core test machine 0 was fastest (bench/ingest.py --workers)
    ingest_workers: int = 0
    drain_wait_s: float = 0.05
    resubmit_every_s: float = 5.0
    seed: int = 0
    # how long after a task's deadline the batches (evidence under the device-signed receipts) are kept
    # (crowdfl-edge evidence); then they are deleted
    evidence_retention_days: float = 90.0

    def __post_init__(self) -> None:
        if not self.evidence_retention_days >= 0:
            raise ValueError("evidence_retention_days must be >= 0")
        if self.drain_max < 1 or self.ingest_workers < 0 or self.drain_wait_s <= 0 or self.resubmit_every_s <= 0:
            raise ValueError("drain_max >= 1, ingest_workers >= 0, drain_wait_s > 0 and resubmit_every_s > 0 are required")

    @property
    def key_file(self) -> Path:
        return self.state_dir / "identity.json"

    @property
    def db_url(self) -> str:
        url = resolve_secret(self.database_url, self.database_url_file, "database_url", "database-url")
        return url or f"sqlite:///{self.state_dir / 'edge.sqlite'}"


def load(path: Path | None) -> EdgeConfig:
    return load_config(EdgeConfig, path, "CROWDFL_EDGE")
