"""Fetching content-addressed artifacts over HTTP: the address is the sha256 of the bytes."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request

from .errors import CrowdflError
from .messages import is_hex64


class ArtifactError(CrowdflError):
    """An artifact could not be fetched or does not match its address."""


def fetch_artifact(base_url: str, sha256: str, max_bytes: int = 64 * 1024 * 1024, timeout_s: float = 30.0) -> bytes:
    """GET ``{base_url}/api/v1/artifacts/{sha256}`` and check the bytes against the address."""
    if not is_hex64(sha256):
        raise ArtifactError("bad_address", f"{sha256!r} is not a sha256 hex digest")
    url = f"{base_url.rstrip('/')}/api/v1/artifacts/{sha256}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            data = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise ArtifactError("http", f"GET {url}: {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ArtifactError("unreachable", f"GET {url}: {exc}") from None
    if len(data) > max_bytes:
        raise ArtifactError("oversized", f"artifact {sha256[:16]} exceeds {max_bytes} bytes")
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ArtifactError("hash_mismatch", f"artifact {sha256[:16]} arrived with sha256 {digest[:16]}")
    return data
