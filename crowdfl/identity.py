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

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .durable import fsync_dir
from .errors import ConfigError

KEY_FILE_VERSION = 1


class Verifier:
    """An Ed25519 public key with ``verify(data, signature)`` raising ValueError on a bad signature.

    The primitives come from ``cryptography`` (OpenSSL): on the coordinator's and edge's venv,
    where web3 caps pycryptodome below 4, its Ed25519 verify is ~30x faster. Keys and signatures
    are plain RFC 8032 / RFC 7748 bytes, so the wire format does not depend on the library.
    """

    __slots__ = ("_key",)

    def __init__(self, raw: bytes) -> None:
        self._key = Ed25519PublicKey.from_public_bytes(raw)

    def verify(self, data: bytes, signature: bytes) -> None:
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            raise ValueError("signature does not verify") from None


def _raw_public(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


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
    def verifier(self) -> Verifier:
        return Verifier(self.sign_key)

    @cached_property
    def enc_public(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.enc_key)

    def to_json(self) -> dict[str, str]:
        return {"node_id": self.node_id, "sign_key": self.sign_key.hex(), "enc_key": self.enc_key.hex()}

    @classmethod
    def from_hex(cls, sign_key: str, enc_key: str) -> PublicIdentity:
        """From the two keys as hex (how registries, configs and the API carry them).

        Raises ValueError unless each is 64 hex characters."""
        try:
            return cls(bytes.fromhex(sign_key), bytes.fromhex(enc_key))
        except (ValueError, TypeError):
            raise ValueError("sign_key and enc_key must be 64 hex characters each") from None

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PublicIdentity:
        try:
            return cls.from_hex(obj["sign_key"], obj["enc_key"])
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
    def _sign_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.sign_seed)

    @cached_property
    def enc_private(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.enc_seed)

    @cached_property
    def public(self) -> PublicIdentity:
        return PublicIdentity(_raw_public(self._sign_key), _raw_public(self.enc_private))

    @property
    def node_id(self) -> str:
        return self.public.node_id

    def sign(self, data: bytes) -> bytes:
        return self._sign_key.sign(data)

    def save(self, path: Path) -> None:
        """Write the key file with 0600 permissions, atomically; never overwrite an existing one."""
        path = Path(path)
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(path.parent.parent)  # the new folder's own entry must survive a power cut too
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
        # the rename is durable only once the folder is: without this a power cut right after first
        # boot can leave no key file, and the next boot makes a new identity the chain does not know
        fsync_dir(path.parent)

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
