"""Participant identities: an Ed25519 signing key and an X25519 encryption key.

A node id is the hex of the 32-byte Ed25519 public key; it is what the chain registry holds and
what MQTT topics and ACLs are named after (its first 16 hex characters, see :func:`short_id`).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from Crypto.Protocol import DH
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from .errors import ConfigError

KEY_FILE_VERSION = 1


@dataclass(frozen=True)
class PublicIdentity:
    sign_key: bytes
    enc_key: bytes

    def __post_init__(self) -> None:
        if len(self.sign_key) != 32 or len(self.enc_key) != 32:
            raise ValueError("public keys must be 32 bytes each")

    @property
    def node_id(self) -> str:
        return self.sign_key.hex()

    @cached_property
    def verifier(self) -> Any:
        return eddsa.new(eddsa.import_public_key(self.sign_key), "rfc8032")

    @cached_property
    def enc_public(self) -> ECC.EccKey:
        return DH.import_x25519_public_key(self.enc_key)

    def to_json(self) -> dict[str, str]:
        return {"node_id": self.node_id, "sign_key": self.sign_key.hex(), "enc_key": self.enc_key.hex()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PublicIdentity:
        try:
            return cls(bytes.fromhex(obj["sign_key"]), bytes.fromhex(obj["enc_key"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError("bad_identity", f"public identity: {exc}") from None


@dataclass(frozen=True)
class Identity:
    """A node's private keys (32-byte seeds)."""

    sign_seed: bytes = field(repr=False)
    enc_seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.sign_seed) != 32 or len(self.enc_seed) != 32:
            raise ValueError("key seeds must be 32 bytes each")

    @classmethod
    def generate(cls) -> Identity:
        return cls(secrets.token_bytes(32), secrets.token_bytes(32))

    @cached_property
    def _sign_key(self) -> ECC.EccKey:
        return eddsa.import_private_key(self.sign_seed)

    @cached_property
    def enc_private(self) -> ECC.EccKey:
        return DH.import_x25519_private_key(self.enc_seed)

    @cached_property
    def public(self) -> PublicIdentity:
        return PublicIdentity(
            self._sign_key.public_key().export_key(format="raw"),
            self.enc_private.public_key().export_key(format="raw"),
        )

    @property
    def node_id(self) -> str:
        return self.public.node_id

    def sign(self, data: bytes) -> bytes:
        return eddsa.new(self._sign_key, "rfc8032").sign(data)

    def save(self, path: Path) -> None:
        """Write the key file with 0600 permissions, atomically; never overwrite an existing one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps(
            {"version": KEY_FILE_VERSION, "sign_seed": self.sign_seed.hex(), "enc_seed": self.enc_seed.hex()}
        ).encode()
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        if path.exists():
            tmp.unlink()
            raise FileExistsError(f"{path} exists; refusing to overwrite a key file")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Identity:
        path = Path(path)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError("key_permissions", f"{path} has mode {mode:o}; it must not be readable by others (chmod 600)")
        try:
            obj = json.loads(path.read_text())
            if obj.get("version") != KEY_FILE_VERSION:
                raise ValueError(f"unsupported key file version {obj.get('version')!r}")
            return cls(bytes.fromhex(obj["sign_seed"]), bytes.fromhex(obj["enc_seed"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError("bad_key_file", f"{path}: {exc}") from None

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[Identity, bool]:
        """Load the key file, or generate one on first boot. Returns (identity, created)."""
        if Path(path).exists():
            return cls.load(path), False
        ident = cls.generate()
        ident.save(path)
        return ident, True


def short_id(node_id: str) -> str:
    """The topic/ACL name of a node: its key's first 16 hex characters."""
    return node_id[:16]
