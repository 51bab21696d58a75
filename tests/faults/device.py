"""The device-side faults: a wall clock that jumps, a disk that fills.

* :class:`FakeClock` drives ``clockshim/sitecustomize.py`` in a child Python process: the test
  writes an offset in seconds, the process's ``time.time()`` moves by it at once.
* :func:`small_tmpfs` mounts a real tmpfs of a given size (the kernel answers ENOSPC when it is
  full, as an SD card's filesystem does); :func:`fill_disk` fills it with a file until the kernel
  refuses, :func:`free_disk` removes that file. Mounting needs CAP_SYS_ADMIN (root, as CI runs
  here) or an unprivileged user+mount namespace; without either the test skips (fails under
  CI=true) with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.realparts import find_executable, require_real_part

CLOCK_SHIM = Path(__file__).resolve().parent / "clockshim"


class FakeClock:
    """The offset file a shimmed process reads; ``jump`` moves its wall clock (seconds, +/-)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0.0
        self.path.write_text("0\n", encoding="ascii")

    def jump(self, seconds: float) -> None:
        self.offset += seconds
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(f"{self.offset!r}\n", encoding="ascii")
        tmp.replace(self.path)  # atomic: the process never reads half a number

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` plus what makes a child Python process use this clock."""
        env = dict(base)
        env["CROWDFL_FAKE_CLOCK_FILE"] = str(self.path)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CLOCK_SHIM), base.get("PYTHONPATH", "")) if p)
        return env


def tmpfs_unavailable() -> str | None:
    """Why a tmpfs cannot be mounted here, or None."""
    if find_executable("mount") is None or find_executable("umount") is None:
        return "mount/umount not found"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (CAP_SYS_ADMIN); run the fault suite as root, as CI does"
    return None


@contextlib.contextmanager
def small_tmpfs(path: Path, size_bytes: int) -> Iterator[Path]:
    """A real tmpfs of ``size_bytes`` at ``path`` (created), unmounted on exit."""
    why = tmpfs_unavailable()
    require_real_part("tmpfs", why is None, why or "")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "crowdfl-fault", str(path)],
        capture_output=True, text=True, check=False,
    )
    require_real_part("tmpfs", done.returncode == 0, f"mount -t tmpfs failed: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill_disk(folder: Path, name: str = "filler.bin") -> Path:
    """Write to ``folder/name`` until the filesystem answers ENOSPC; returns the file."""
    filler = folder / name
    chunk = b"\0" * 65536
    with filler.open("ab", buffering=0) as fh:
        while True:
            try:
                fh.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    return filler


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize
