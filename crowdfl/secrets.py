"""Secrets (admin token, database URL with its password, chain key) from files, not from the TOML.

A secret can come from, in this order: a ``*_file`` setting naming a file that only its owner can
read; the same value inline in the TOML or an environment override (for tests and development);
a systemd credential, i.e. ``$CREDENTIALS_DIRECTORY/<name>`` as ``LoadCredential=`` provides it.
Setting both the value and its file is an error, so nobody wonders which one is in force.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError


def read_secret_file(path: Path, what: str) -> str:
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o007:
            raise ConfigError("secret_permissions", f"{what}: {path} is readable by others (mode {mode:o}); chmod 600 or 640")
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError("secret_file", f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if not value:
        raise ConfigError("secret_file", f"{what}: {path} is empty")
    return value


def resolve_secret(
    inline: str,
    file: Path | None,
    what: str,
    credential: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The secret from ``file``, else ``inline``, else the systemd credential ``credential``; or ""."""
    if inline and file is not None:
        raise ConfigError("secret_twice", f"{what}: set either the value or {what}_file, not both")
    if file is not None:
        return read_secret_file(Path(file), what)
    if inline:
        return inline
    env = os.environ if environ is None else environ
    creds = env.get("CREDENTIALS_DIRECTORY")
    if credential and creds:
        path = Path(creds) / credential
        if path.exists():
            try:
                value = path.read_text().strip()
            except OSError as exc:
                raise ConfigError("secret_file", f"{what}: cannot read credential {path}: {exc.strerror}") from None
            if not value:
                raise ConfigError("secret_file", f"{what}: credential {path} is empty")
            return value
    return ""
