"""Submitting signed updates to the coordinator's HTTP API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass


# Refusals that can turn into an acceptance without the update changing: the coordinator does not
# know this edge, the customer or the task *yet* (registration and publication travel separately),
# or it asks to be called later. They are retried; every other 4xx is final.
RETRYABLE_REJECTIONS = frozenset({"unknown_sender", "unknown_customer", "unknown_task"})
RETRYABLE_STATUS = frozenset({408, 425, 429})


@dataclass(frozen=True)
class SubmitResult:
    status: str  # accepted | duplicate | rejected | retry
    detail: str = ""
    reached: bool = True  # False: the coordinator did not answer (retry everything later)

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
            if not isinstance(body, dict):
                body = {}
            detail = f"{body.get('error', exc.code)}: {body.get('detail', exc.reason)}"
            if exc.code in RETRYABLE_STATUS or str(body.get("error", "")) in RETRYABLE_REJECTIONS:
                return SubmitResult("retry", f"HTTP {exc.code} {detail}")
            if 400 <= exc.code < 500:
                return SubmitResult("rejected", detail)
            return SubmitResult("retry", f"HTTP {exc.code}", reached=False)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return SubmitResult("retry", str(exc), reached=False)
