"""The image's source files, checked without building it (fast)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.config import load

IMAGE = Path(__file__).resolve().parents[2] / "hardware" / "image"


def test_manufacturer_template_is_a_valid_agent_config() -> None:
    cfg = load(IMAGE / "crowdfl.toml.example")
    assert cfg.mqtt.tls and cfg.mqtt.ca_file == Path("/etc/crowdfl/ca.crt")
    assert cfg.state_dir == Path("/var/lib/crowdfl-agent")  # where the unit's StateDirectory is
    # real usage from the home's smart plugs, not the simulator; with no [[plugs]] yet, the first
    # boot stops with an error saying so (crowdfl-firstboot)
    assert cfg.source.kind == "none" and cfg.plugs == ()
    assert "no smart plugs configured" in (IMAGE / "overlay/opt/crowdfl/bin/crowdfl-firstboot").read_text()
    # the MQTT password is the systemd credential the image's drop-in loads from /etc/credstore,
    # where crowdfl-firstboot moves crowdfl-mqtt.password from the boot partition
    assert cfg.mqtt.password_file is not None and cfg.mqtt.password is None
    dropin = (IMAGE / "overlay/etc/systemd/system/crowdfl-agent.service.d/10-image.conf").read_text()
    name = cfg.mqtt.password_file.name
    assert cfg.mqtt.password_file.parent == Path("/run/credentials/crowdfl-agent.service")
    assert f"LoadCredential={name}:crowdfl-agent.{name}" in dropin
    firstboot = (IMAGE / "overlay/opt/crowdfl/bin/crowdfl-firstboot").read_text()
    assert f"password:{name}" in firstboot and '"/etc/credstore/crowdfl-agent.${pair#*:}"' in firstboot


@pytest.mark.parametrize("script", ["build.sh", "base.sh", "mkinitrd.sh", "initramfs-init",
                                    "overlay/opt/crowdfl/bin/crowdfl-firstboot", "overlay/opt/crowdfl/bin/crowdfl-health",
                                    "overlay/opt/crowdfl/bin/crowdfl-growroot"])
def test_scripts_parse(script: str) -> None:
    path = IMAGE / script
    shell = "sh" if path.read_text().startswith(("#!/bin/sh", "#!/bin/busybox")) else "bash"
    subprocess.run([shell, "-n", str(path)], check=True)
    if script.startswith("overlay/opt"):
        assert path.stat().st_mode & 0o111, f"{script} is not executable"


BINFMT_HARNESS = r"""
set -euo pipefail
eval "$(sed -n '/^# binfmt_misc: enable qemu-aarch64/,/^tmp_dirs=()/p' "$BUILD_SH")"
log() { :; }
case $1 in
    user)  # enable binfmt, signal "in use", wait for "go", then leave
        ensure_binfmt; touch "$WORK/$2.in"
        while [ ! -e "$WORK/$2.go" ]; do sleep 0.05; done
        cleanup_binfmt; touch "$WORK/$2.out" ;;
esac
"""


def test_builds_with_different_caches_leave_binfmt_to_the_last_one(tmp_path: Path) -> None:
    """Two builds (different caches) use binfmt at once: the one that enabled it leaves first and
    must not disable it under the other; the last one out restores what was found."""
    import os
    import time

    fake = tmp_path / "binfmt"  # a binfmt_misc dir: "register" mounted, qemu-aarch64 disabled
    fake.mkdir()
    (fake / "register").write_text("")
    (fake / "qemu-aarch64").write_text("disabled\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    (bin_dir / "update-binfmts").write_text(
        f'#!/bin/sh\necho "update-binfmts $*" >>{calls}\n'
        f'case $1 in --enable) echo enabled >{fake}/qemu-aarch64 ;; --disable) echo disabled >{fake}/qemu-aarch64 ;; esac\n')
    (bin_dir / "update-binfmts").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "BUILD_SH": str(IMAGE / "build.sh"),
           "WORK": str(tmp_path), "CROWDFL_BINFMT_LOCK": str(tmp_path / "lock" / "binfmt"),
           "CROWDFL_BINFMT_DIR": str(fake)}

    def start(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["bash", "-c", BINFMT_HARNESS, "harness", "user", name], env=env)

    def wait(path: Path) -> None:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert time.monotonic() < deadline, f"{path.name} never appeared"
            time.sleep(0.05)

    a = start("a")
    wait(tmp_path / "a.in")
    b = start("b")
    wait(tmp_path / "b.in")
    assert (fake / "qemu-aarch64").read_text() == "enabled\n"
    (tmp_path / "a.go").touch()  # the build that enabled binfmt finishes first
    assert a.wait(30) == 0
    assert (fake / "qemu-aarch64").read_text() == "enabled\n", "disabled under the other build"
    (tmp_path / "b.go").touch()
    assert b.wait(30) == 0
    assert (fake / "qemu-aarch64").read_text() == "disabled\n", "not restored by the last build"
    assert calls.read_text().splitlines() == ["update-binfmts --enable qemu-aarch64", "update-binfmts --disable qemu-aarch64"]
    assert not (tmp_path / "lock" / "binfmt.restore").exists()
