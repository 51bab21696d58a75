"""Content-addressed storage of model artifacts and updates: the address is the sha256 of the bytes.

Any copy can be checked by hashing it; ``get`` always does, so a tampered or truncated file is
reported, never served. The local directory is the embedded default; another backend (IPFS, S3)
implements the same three methods.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Protocol

from crowdfl.durable import fsync_dir
from crowdfl.errors import CrowdflError
from crowdfl.messages import is_hex64


class StoreError(CrowdflError):
    """An artifact is missing, or its bytes do not match its address."""


def _check_address(address: str) -> str:
    if not is_hex64(address):
        raise StoreError("bad_address", f"{address!r} is not a lowercase sha256 hex digest")
    return address


class ContentStore(Protocol):
    def put(self, data: bytes) -> str: ...

    def get(self, address: str) -> bytes: ...

    def has(self, address: str) -> bool: ...


class LocalContentStore:
    """Files under ``root/aa/bbbb…``, written atomically."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, address: str) -> Path:
        _check_address(address)
        return self.root / address[:2] / address[2:]

    def put(self, data: bytes) -> str:
        address = hashlib.sha256(data).hexdigest()
        path = self.path(address)
        if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == address:
            return address
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root)  # the new fan-out folder's entry must survive a power cut too
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself is durable only once its folder is
        return address

    def get(self, address: str) -> bytes:
        path = self.path(address)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreError("missing", f"artifact {address[:16]} is not in the store") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != address:
            raise StoreError("corrupt", f"artifact {address[:16]} has sha256 {actual[:16]}: the stored copy was altered")
        return data

    def has(self, address: str) -> bool:
        return self.path(address).exists()
