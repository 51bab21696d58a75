"""The rule for real parts, and the small process helpers the harnesses share.

A test that needs a real broker, database or tool skips on a developer's machine that lacks it,
but fails in CI (``CI=true``): there a missing part is a broken install step, and a green run
that skipped everything would hide it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require_real_part(name: str, available: bool, reason: str) -> None:
    """Skip (or, under CI=true, fail) the calling test when a real part is missing."""
    if available:
        return
    message = f"real part {name!r} unavailable: {reason}"
    if in_ci():
        pytest.fail(
            f"{message} (CI=true: missing real parts are failures)", pytrace=False
        )
    pytest.skip(message)


def require_module(module: str, install_hint: str) -> Any:
    """Import a Python package a test needs (an extra, a reference implementation), or skip the
    test, or under CI=true fail it: there a missing package is a broken install step."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        require_real_part(module, False, f"{exc}; {install_hint}")
        raise  # not reached: require_real_part skipped or failed


def find_executable(
    name: str, extra_dirs: Iterable[str | Path] = ("/usr/sbin", "/sbin")
) -> str | None:
    """``shutil.which``, then a few sbin folders that a non-root PATH usually lacks."""
    found = shutil.which(name)
    if found:
        return found
    for folder in extra_dirs:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago; callers retry start-up if they lose the race."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct free ports, all held open together so none is handed out twice."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_ports(
    host: str,
    ports: Sequence[int],
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until every port accepts a TCP connection; give up early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process exited with code {proc.returncode} before listening"
            )
        pending = [p for p in pending if not port_accepts(host, p)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"ports {pending} on {host} not accepting after {timeout:.0f} s"
            )
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: never leave a child behind."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def run_checked(
    args: Sequence[str], **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run a set-up command; on failure raise with its output, which ``check=True`` would hide."""
    result = subprocess.run(
        list(args), check=False, capture_output=True, text=True, **kwargs
    )  # type: ignore[call-overload]
    if result.returncode != 0:
        raise RuntimeError(
            f"command failed ({result.returncode}): {' '.join(args)}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result  # type: ignore[no-any-return]
