"""The error types at crowdfl's boundaries.

Each boundary raises one type carrying a machine-readable ``code`` and a human ``detail``, so the
caller can count rejections by reason, log them and go on.
"""

from __future__ import annotations


class CrowdflError(Exception):
    """Base of crowdfl's boundary errors."""

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)


class WireError(CrowdflError):
    """A message or envelope that cannot be accepted (truncated, tampered, replayed, ...)."""


class ConfigError(CrowdflError):
    """A configuration file or environment override that is invalid."""


class PrivacyError(CrowdflError):
    """A release the privacy policy forbids (budget, epsilon, re-release)."""
