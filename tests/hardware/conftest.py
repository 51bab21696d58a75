"""The arm64 SD-card image, built (or found in the cache) once per session by hardware/image/build.sh."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.realparts import find_executable, require_real_part

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "hardware" / "image" / "build.sh"
TOOLS = ("debootstrap", "qemu-aarch64-static", "qemu-system-aarch64", "update-binfmts", "mke2fs", "mkfs.fat",
         "mcopy", "sfdisk", "cpio", "dpkg-deb")
BUILD_TIMEOUT_S = 40 * 60  # a fresh machine: ~6-8 min measured; generous for a loaded CI box


@dataclass(frozen=True)
class BuiltImage:
    directory: Path
    info: dict[str, object]
    seconds: float  # this session's wall time for build.sh (small when it came from the cache)

    @property
    def image(self) -> Path:
        return self.directory / "crowdfl.img"

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs"

    @property
    def kernel(self) -> Path:
        return self.directory / "qemu" / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "qemu" / "initrd.gz"


@pytest.fixture(scope="session")
def arm64_image() -> BuiltImage:
    missing = [t for t in TOOLS if find_executable(t) is None]
    require_real_part("qemu-arm64", not missing, f"missing {', '.join(missing)} (run .ci/install-system.sh)")
    require_real_part("qemu-arm64", os.geteuid() == 0, "building the image needs root (debootstrap, chroot)")
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    seconds = time.monotonic() - t0
    if res.returncode != 0:
        pytest.fail(f"hardware/image/build.sh failed ({res.returncode}):\n{res.stderr[-6000:]}", pytrace=False)
    directory = Path(res.stdout.strip().splitlines()[-1])
    info = json.loads((directory / "build.json").read_text())
    print(f"\nimage {directory} ({seconds:.0f} s this session): {json.dumps(info)}")
    return BuiltImage(directory, info, seconds)
