"""The coordinator's configuration (one TOML file, ``CROWDFL_COORDINATOR__*`` environment overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from crowdfl.config import load_config
from crowdfl.mqtt import MqttSettings
from crowdfl.secrets import resolve_secret
from crowdfl.serving import HttpLimits

from .claims import ClaimLimits
from .defence import DefenceConfig
from .reputation import ReputationConfig, TrustReputationConfig


@dataclass(frozen=True)
class ChainSettings:
    kind: str = "embedded"  # embedded (eth-tester, in-process, lost on exit) | rpc
    rpc_url: str = ""
    # hex key of the manufacturer's sealer/owner account (0600 file), else the systemd credential "chain-key"
    private_key_file: Path | None = None
    chain_id: int | None = None
    confirmations: int = 0
    gas_price_wei: int | None = None
    poa: bool = True


@dataclass(frozen=True)
class CoordinatorConfig:
    state_dir: Path = Path("/var/lib/crowdfl-coordinator")
    database_url: str = ""
    database_url_file: Path | None = None  # or the systemd credential "database-url" (the URL holds the password)
    api_host: str = "127.0.0.1"
    api_port: int = 8470
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    chain: ChainSettings = field(default_factory=ChainSettings)
    round_timeout_s: float = 3600.0
    byzantine_fraction: float = 0.2
    trim_beta: float = 0.1
    # bearer token for the admin API (register/remove participants, publish tasks); empty: disabled
    admin_token: str = ""
    admin_token_file: Path | None = None  # or the systemd credential "admin-token"
    max_participants: int = 0  # customers per round; 0: every eligible one
    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    # defended rounds (coordinator/defence.py) and the reputation they feed; docs/robustness.md
    defence: DefenceConfig = field(default_factory=DefenceConfig)
    trust: TrustReputationConfig = field(default_factory=TrustReputationConfig)
    # the API's waitress limits: body (chunked too; 413), headers (431), idle connections, threads
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    # claims the coordinator sends (and pays gas for) on a customer's behalf: rationed (coordinator/claims.py)
    claims: ClaimLimits = field(default_factory=ClaimLimits)

    @property
    def key_file(self) -> Path:
        return self.state_dir / "identity.json"

    @property
    def db_url(self) -> str:
        url = resolve_secret(self.database_url, self.database_url_file, "database_url", "database-url")
        return url or f"sqlite:///{self.state_dir / 'coordinator.sqlite'}"

    @property
    def admin_bearer(self) -> str:
        return resolve_secret(self.admin_token, self.admin_token_file, "admin_token", "admin-token")


def load(path: Path | None) -> CoordinatorConfig:
    return load_config(CoordinatorConfig, path, "CROWDFL_COORDINATOR")
