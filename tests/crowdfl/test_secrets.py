"""Secrets from files and systemd credentials (crowdfl/secrets.py), and the roles' settings that use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from crowdfl.errors import ConfigError
from crowdfl.secrets import resolve_secret


def _secret(tmp_path: Path, text: str, mode: int = 0o600, name: str = "s") -> Path:
    p = tmp_path / name
    p.write_text(text)
    p.chmod(mode)
    return p


def test_file_wins_and_is_stripped(tmp_path: Path) -> None:
    assert resolve_secret("", _secret(tmp_path, "tok3n\n"), "admin_token", environ={}) == "tok3n"


def test_inline_value_still_works_and_both_at_once_is_an_error(tmp_path: Path) -> None:
    assert resolve_secret("inline", None, "admin_token", environ={}) == "inline"
    with pytest.raises(ConfigError, match="not both"):
        resolve_secret("inline", _secret(tmp_path, "x"), "admin_token", environ={})


def test_a_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="readable by others"):
        resolve_secret("", _secret(tmp_path, "x", 0o644), "database_url", environ={})
    assert resolve_secret("", _secret(tmp_path, "y", 0o640, "g"), "database_url", environ={}) == "y"


def test_missing_or_empty_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="database_url: cannot read"):
        resolve_secret("", tmp_path / "absent", "database_url", environ={})
    with pytest.raises(ConfigError, match="is empty"):
        resolve_secret("", _secret(tmp_path, "\n"), "database_url", environ={})


def test_systemd_credential_is_the_fallback(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "admin-token").write_text("from-systemd\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert resolve_secret("", None, "admin_token", "admin-token", environ=env) == "from-systemd"
    assert resolve_secret("inline", None, "admin_token", "admin-token", environ=env) == "inline"
    assert resolve_secret("", None, "database_url", "database-url", environ=env) == ""
    assert resolve_secret("", None, "admin_token", "admin-token", environ={}) == ""
