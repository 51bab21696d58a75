"""Submitting signed updates to the coordinator's HTTP API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class SubmitResult:
    status: str  # accepted | duplicate | rejected | retry
    detail: str = ""

    @property
    def final(self) -> bool:
        """True when resending cannot change the outcome."""
        return self.status != "retry"


class CoordinatorClient:
    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        self.url = base_url.rstrip("/") + "/api/v1/updates"
        self.timeout_s = timeout_s

    def submit(self, envelope: bytes) -> SubmitResult:
        req = urllib.request.Request(
            self.url, data=envelope, method="POST", headers={"Content-Type": "application/octet-stream"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                body = json.loads(resp.read(65536) or b"{}")
                return SubmitResult(str(body.get("status", "accepted")), str(body.get("detail", "")))
        except urllib.error.HTTPError as exc:
            try:
                body = json.loads(exc.read(65536) or b"{}")
            except ValueError:
                body = {}
            if 400 <= exc.code < 500:
                return SubmitResult("rejected", f"{body.get('error', exc.code)}: {body.get('detail', exc.reason)}")
            return SubmitResult("retry", f"HTTP {exc.code}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return SubmitResult("retry", str(exc))
