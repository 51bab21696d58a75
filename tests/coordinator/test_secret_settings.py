"""The servers' secrets come from *_file settings or systemd credentials, never only from the TOML."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli import load as load_coordinator
from crowdfl.errors import ConfigError
from edge_server.config import load as load_edge


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_coordinator_reads_token_and_database_url_from_files(tmp_path: Path) -> None:
    token = _private(tmp_path / "token", "s3cret-token\n")
    url = _private(tmp_path / "db", "postgresql+psycopg://crowdfl:pw@db.example/crowdfl\n")
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f'state_dir = "{tmp_path}"\nadmin_token_file = "{token}"\ndatabase_url_file = "{url}"\n')
    cfg = load_coordinator(cfg_file)
    assert cfg.admin_bearer == "s3cret-token"
    assert cfg.db_url == "postgresql+psycopg://crowdfl:pw@db.example/crowdfl"


def test_coordinator_secrets_from_systemd_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "admin-token").write_text("cred-token")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f'state_dir = "{tmp_path}"\n')
    cfg = load_coordinator(cfg_file)
    assert cfg.admin_bearer == "cred-token"
    assert cfg.db_url == f"sqlite:///{tmp_path / 'coordinator.sqlite'}"  # no credential: the default


def test_world_readable_secret_file_is_refused(tmp_path: Path) -> None:
    url = tmp_path / "db"
    url.write_text("postgresql+psycopg://crowdfl:pw@db/crowdfl")
    url.chmod(0o644)
    cfg_file = tmp_path / "e.toml"
    cfg_file.write_text(f'state_dir = "{tmp_path}"\ndatabase_url_file = "{url}"\n')
    with pytest.raises(ConfigError, match="readable by others"):
        load_edge(cfg_file).db_url
