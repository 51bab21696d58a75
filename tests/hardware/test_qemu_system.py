"""The SD-card image booted as a whole arm64 machine: QEMU ``-M virt -cpu cortex-a72`` (TCG).

The test drops a crowdfl.toml on a copy of the image's boot partition (as the manufacturer
would), boots it with a Debian arm64 kernel and a busybox initramfs (the image carries no kernel
for QEMU; see the README), and lets systemd run the image as it is: crowdfl-firstboot installs
the configuration and generates the keys on the device, prints the public halves on the
console, and crowdfl-agent.service (DynamicUser, the full sandbox) starts. The test registers
the device from the printed keys, publishes a task, and waits for the device's noisy features
at the edge server on the host.

Networking is QEMU user mode with ``restrict=on``: the guest reaches nothing but two guestfwd
addresses, relayed to the host's MQTT broker and the coordinator's artifact API on 127.0.0.1.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hardware.conftest import BuiltImage
from tests.hardware.hostside import DEVICE_LINE, DeviceKeys, HostSide
from tests.support.realparts import find_executable, stop_process

pytestmark = [pytest.mark.realpart, pytest.mark.slow]

RELAY = Path(__file__).with_name("guestfwd_relay.py")
MQTT_ADDR = "10.0.2.100"
API_ADDR = "10.0.2.101"
HEALTH = re.compile(r"crowdfl-health: (state=.*)")
SAMPLES_PER_ROUND = 16  # the default task: a 24-hour window every 25 hours; the 28-day backfill holds about 26


def health_fields(line: str) -> dict[str, str]:
    """``crowdfl-health: state=active pid=231 uid=61234 ...`` -> {"state": "active", ...}."""
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


class Console:
    """The guest's serial console, written by QEMU to a file and read as it grows."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes]) -> None:
        self.path, self.proc = path, proc

    def text(self) -> str:
        return self.path.read_bytes().decode("utf-8", "replace") if self.path.exists() else ""

    def wait_for(self, pattern: re.Pattern[str], timeout: float, start: int = 0,
                 accept: Callable[[re.Match[str]], bool] = lambda m: True) -> re.Match[str]:
        """The first match at or after ``start`` that ``accept`` takes."""
        deadline = time.monotonic() + timeout
        while True:
            for m in pattern.finditer(self.text(), start):
                if accept(m):
                    return m
            if self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited ({self.proc.returncode}); console:\n{self.text()[-6000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern.pattern!r} not on the console after {timeout:.0f} s:\n{self.text()[-6000:]}")
            time.sleep(0.5)


def write_boot_file(image: Path, offset: int, name: str, content: str, tmp: Path) -> None:
    """Copy a file onto the image's FAT boot partition in place (mtools, no mount)."""
    src = tmp / name
    src.write_text(content)
    subprocess.run(["mcopy", "-o", "-i", f"{image}@@{offset}", str(src), f"::/{name}"], check=True,
                   env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}, capture_output=True)


def qemu_command(img: BuiltImage, disk: Path, console: Path, mqtt_port: int, api_port: int) -> list[str]:
    qemu = find_executable("qemu-system-aarch64")
    assert qemu is not None

    def fwd(addr: str, guest_port: int, host_port: int) -> str:
        # one relay process per guest connection, to 127.0.0.1 only (guestfwd_relay.py)
        return f"guestfwd=tcp:{addr}:{guest_port}-cmd:{sys.executable} {RELAY} {host_port}"

    netdev = ",".join(["user", "id=n0", "restrict=on", fwd(MQTT_ADDR, 1883, mqtt_port), fwd(API_ADDR, 80, api_port)])
    append = " ".join([
        "console=ttyAMA0", "root=LABEL=CROWDFLROOT", "panic=-1",
        "systemd.journald.forward_to_console=1",  # the agent's log on the serial console too
        "systemd.wants=crowdfl-health.service",   # state + memory line every 15 s
    ])
    return [
        qemu, "-M", "virt", "-cpu", "cortex-a72", "-smp", "2", "-m", "1024",
        "-display", "none", "-monitor", "none", "-serial", f"file:{console}", "-no-reboot",
        "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", append,
        "-drive", f"file={disk},format=raw,if=virtio,cache=unsafe",
        # romfile= : no option ROM (Debian's efi-virtio.rom is in ipxe-qemu, not installed)
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-device", "virtio-rng-pci",
    ]


def test_image_boots_and_its_agent_reaches_the_edge(arm64_image: BuiltImage, tmp_path: Path) -> None:
    host = HostSide(tmp_path / "host", samples_per_round=SAMPLES_PER_ROUND)
    qemu: subprocess.Popen[bytes] | None = None
    try:
        disk = tmp_path / "sd.img"
        subprocess.run(["cp", "--sparse=always", str(arm64_image.image), str(disk)], check=True)
        toml = host.agent_config(MQTT_ADDR, 1883, f"http://{API_ADDR}", seed=5, resend_after_s=10.0)
        write_boot_file(disk, int(arm64_image.info["boot_partition_offset"]), "crowdfl.toml", toml, tmp_path)  # type: ignore[arg-type]

        console_path = tmp_path / "console.log"
        t0 = time.monotonic()
        with (tmp_path / "qemu.log").open("wb") as qemu_log:
            qemu = subprocess.Popen(qemu_command(arm64_image, disk, console_path, host.broker.port, host.api.port),
                                    stdout=qemu_log, stderr=subprocess.STDOUT)
        console = Console(console_path, qemu)

        # first boot: the device generated its keys and printed the public halves
        dev = console.wait_for(DEVICE_LINE, timeout=600)
        t_keys = time.monotonic() - t0
        keys = DeviceKeys.parse(dev.group(1))
        host.register([keys])
        # the agent is up under systemd and its usage log has its history
        def ready(m: re.Match[str]) -> bool:
            f = health_fields(m.group(1))
            return f.get("state") == "active" and f.get("usage_reports", "?").isdigit() and int(f["usage_reports"]) > 0

        health = health_fields(console.wait_for(HEALTH, 600, accept=ready).group(1))
        t_ready = time.monotonic() - t0
        # the shipped unit's sandbox ran it: a dynamic user (systemd's 61184-65519), not root
        assert 61184 <= int(health["uid"]) <= 65519, health
        boot = re.search(r"Startup finished in (.*?) \(kernel\) \+ (.*?) \(userspace\) = (\S+)", console.text())

        t_pub = time.monotonic()
        host.publish_task()
        host.wait_for_batches({keys.node_id}, timeout=900, alive=lambda: qemu is not None and qemu.poll() is None)
        first_s = time.monotonic() - t_pub
        total_s = time.monotonic() - t0
        assert host.edge.store.counts()["samples"] == SAMPLES_PER_ROUND
        assert not host.edge.store.rejection_counts()

        # one more health line after the batch was sent: the agent's memory on arm64
        after = health_fields(console.wait_for(HEALTH, timeout=60, start=len(console.text())).group(1))
        text = console.text()
        assert f"agent {keys.node_id[:16]} running" in text, text[-4000:]
        assert re.search(r"round 1: released %d samples" % SAMPLES_PER_ROUND, text), text[-4000:]
        assert "Failed to start crowdfl" not in text, text[-4000:]
        print(
            f"\nqemu-system-aarch64 (TCG, cortex-a72 x2, 1 GiB): keys on the console {t_keys:.1f} s after start; "
            f"systemd: {boot.group(0) if boot else 'no Startup finished line'}; agent ready (usage log filled) "
            f"{t_ready:.1f} s; first batch at the edge {first_s:.1f} s after the task was published, "
            f"{total_s:.1f} s after QEMU started; agent on arm64 (uid {after['uid']}): RSS {after['rss_kb']} kB, "
            f"peak {after['hwm_kb']} kB, cgroup {after['cgroup_bytes']} bytes"
        )
    finally:
        if qemu is not None:
            stop_process(qemu, timeout=20)
        host.close()
    # the card carries the same public keys for the manufacturer (read with mtools, no mount)
    card = subprocess.run(["mtype", "-i", f"{disk}@@{arm64_image.info['boot_partition_offset']}", "::/crowdfl-device.json"],
                          capture_output=True, text=True, check=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
    assert DeviceKeys.parse(card.stdout) == keys
    # no relay left behind (each exits when QEMU closes its connection)
    def relays() -> list[str]:
        return subprocess.run(["pgrep", "-f", str(RELAY)], capture_output=True, text=True).stdout.split()

    deadline = time.monotonic() + 30  # each relay exits on its own; a loaded machine may take a moment
    while (left := relays()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"guestfwd relays still running: {left}"
