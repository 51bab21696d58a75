"""Booting the SD-card image under qemu-system-aarch64: one home for the tests and bench/image.py.

``boot_virt`` runs the image as QEMU's generic ``virt`` machine with the network relayed to a
host side (broker, coordinator API, edge server on 127.0.0.1), through a whole round: the device's
keys on the console, registration, the task, the device's features at the edge, and its memory
after sending them. ``boot_raspi3b`` runs it as a Raspberry Pi 3 with everything the board boots
read from the image's own FAT partition, until the agent's unit is active (that board model has
no network for the guest).

Nothing is mounted: files go onto the FAT partition with mtools and, for a systemd drop-in an
experiment needs, onto the ext4 root with debugfs (``extra_root_files``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crowdfl.identity import Identity
from tests.hardware.conftest import BuiltImage
from tests.hardware.hostside import DEVICE_LINE, DeviceKeys, HostSide
from tests.support.realparts import find_executable, require_real_part, stop_process

RELAY = Path(__file__).with_name("guestfwd_relay.py")
MQTT_ADDR = "10.0.2.100"
API_ADDR = "10.0.2.101"
HEALTH = re.compile(r"crowdfl-health: (state=.*)")
STARTUP = re.compile(r"Startup finished in (.*?) \(kernel\) \+ (.*?) \(userspace\) = (\S+)")
SD_BYTES = 2 * 1024**3  # the raspi3b's card: QEMU's SD model wants a power of two
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}


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
                   env=MTOOLS_ENV, capture_output=True)


def read_boot_file(image: Path, offset: int, name: str, dest: Path) -> Path:
    """Copy a file off the image's FAT boot partition (mtools, no mount)."""
    subprocess.run(["mcopy", "-n", "-i", f"{image}@@{offset}", f"::/{name}", str(dest)], check=True,
                   env=MTOOLS_ENV, capture_output=True)
    return dest


def write_root_file(image: Path, offset: int, path: str, content: str, tmp: Path, mode: int = 0o644) -> None:
    """Write a file (root-owned, ``mode``; its directory created) into the image's ext4 root, with debugfs."""
    debugfs = find_executable("debugfs")
    assert debugfs is not None, "debugfs (e2fsprogs) is missing"
    src = tmp / Path(path).name
    src.write_text(content)
    target = f"{image}?offset={offset}"
    parent = str(Path(path).parent)
    # mkdir fails harmlessly when the directory exists; write refuses to overwrite, so rm first
    script = f"mkdir {parent}\nrm {path}\nwrite {src} {path}\nsif {path} mode 0{0o100000 | mode:o}\n"
    subprocess.run([debugfs, "-w", "-f", "-", target], input=script, text=True, check=True, capture_output=True)
    out = subprocess.run([debugfs, "-R", f"cat {path}", target], text=True, check=True, capture_output=True).stdout
    assert out == content, f"debugfs wrote {out!r} to {path}"


def copy_image(image: BuiltImage, tmp: Path, extra_root_files: dict[str, str] | None = None) -> Path:
    """A copy of the image to boot; ``extra_root_files`` (path -> content; a "#!" file is made
    executable) are written into its root file system."""
    disk = tmp / "sd.img"
    subprocess.run(["cp", "--sparse=always", str(image.image), str(disk)], check=True)
    for path, content in (extra_root_files or {}).items():
        write_root_file(disk, int(image.info["root_partition_offset"]), path, content, tmp,  # type: ignore[arg-type]
                        mode=0o755 if content.startswith("#!") else 0o644)
    return disk


def qemu_binary() -> str:
    qemu = find_executable("qemu-system-aarch64")
    require_real_part("qemu-arm64", qemu is not None, "no qemu-system-aarch64 (run .ci/install-system.sh)")
    assert qemu is not None
    return qemu


def virt_command(img: BuiltImage, disk: Path, console: Path, mqtt_port: int, api_port: int) -> list[str]:
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
        qemu_binary(), "-M", "virt", "-cpu", "cortex-a72", "-smp", "2", "-m", "1024",
        "-display", "none", "-monitor", "none", "-serial", f"file:{console}", "-no-reboot",
        "-kernel", str(img.kernel), "-initrd", str(img.initrd), "-append", append,
        "-drive", f"file={disk},format=raw,if=virtio,cache=unsafe",
        # romfile= : no option ROM (Debian's efi-virtio.rom is in ipxe-qemu, not installed)
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-device", "virtio-rng-pci",
    ]


@dataclass(frozen=True)
class VirtRun:
    keys: DeviceKeys
    keys_s: float  # QEMU start -> the device's keys on the console
    ready_s: float  # QEMU start -> the agent active with its usage log filled
    first_batch_s: float  # task published -> the device's batch stored at the edge
    total_s: float  # QEMU start -> that batch
    ready_health: dict[str, str]
    after_health: dict[str, str]  # the first health line after the batch was stored
    startup: str | None
    samples: int
    rejections: dict[str, int]
    console: str
    disk: Path


def boot_virt(image: BuiltImage, tmp: Path, samples_per_round: int, seed: int = 5,
              extra_root_files: dict[str, str] | None = None, timeout: float = 900) -> VirtRun:
    """One device on QEMU virt through a whole round; QEMU and the host side are stopped on return."""
    host = HostSide(tmp / "host", samples_per_round=samples_per_round)
    qemu: subprocess.Popen[bytes] | None = None
    try:
        disk = copy_image(image, tmp, extra_root_files)
        toml = host.agent_config(MQTT_ADDR, 1883, f"http://{API_ADDR}", seed=seed, resend_after_s=10.0)
        write_boot_file(disk, int(image.info["boot_partition_offset"]), "crowdfl.toml", toml, tmp)  # type: ignore[arg-type]
        console_path = tmp / "console.log"
        t0 = time.monotonic()
        with (tmp / "qemu.log").open("wb") as qemu_log:
            qemu = subprocess.Popen(virt_command(image, disk, console_path, host.broker.port, host.api.port),
                                    stdout=qemu_log, stderr=subprocess.STDOUT)
        console = Console(console_path, qemu)
        # first boot: the device generated its keys and printed the public halves
        keys = DeviceKeys.parse(console.wait_for(DEVICE_LINE, timeout=timeout).group(1))
        keys_s = time.monotonic() - t0
        host.register([keys])

        def ready(m: re.Match[str]) -> bool:  # the agent is up and its usage log has its history
            f = health_fields(m.group(1))
            return f.get("state") == "active" and f.get("usage_reports", "?").isdigit() and int(f["usage_reports"]) > 0

        ready_health = health_fields(console.wait_for(HEALTH, timeout, accept=ready).group(1))
        ready_s = time.monotonic() - t0
        t_pub = time.monotonic()
        host.publish_task()
        proc = qemu
        host.wait_for_batches({keys.node_id}, timeout=timeout, alive=lambda: proc.poll() is None)
        first_batch_s = time.monotonic() - t_pub
        total_s = time.monotonic() - t0
        # one more health line after the batch was sent: the agent's memory on arm64
        after = health_fields(console.wait_for(HEALTH, timeout=60, start=len(console.text())).group(1))
        text = console.text()
        startup = STARTUP.search(text)
        return VirtRun(keys, keys_s, ready_s, first_batch_s, total_s, ready_health, after,
                       startup.group(0) if startup else None, host.edge.store.counts()["samples"],
                       dict(host.edge.store.rejection_counts()), text, disk)
    finally:
        if qemu is not None:
            stop_process(qemu, timeout=20)
        host.close()


def offline_agent_config(seed: int) -> str:
    """A complete crowdfl.toml whose broker and coordinator are out of reach (the board has no network)."""
    edge, coordinator = Identity.generate(), Identity.generate()
    return "\n".join([
        "[mqtt]", f'host = "{MQTT_ADDR}"', "port = 1883",
        "[edge]", f'sign_key = "{edge.public.sign_key.hex()}"', f'enc_key = "{edge.public.enc_key.hex()}"',
        "[coordinator]", f'sign_key = "{coordinator.public.sign_key.hex()}"', f'url = "http://{API_ADDR}"',
        "[source]", 'kind = "simulated"', f"seed = {seed}",
    ]) + "\n"


@dataclass(frozen=True)
class RaspiRun:
    grown_from: int
    grown_to: int
    keys: DeviceKeys
    health: dict[str, str]
    agent_active_s: float  # QEMU start -> the first health line saying "active"
    startup: str | None
    cmdline: str  # cmdline.txt as read from the card
    console: str


def boot_raspi3b(image: BuiltImage, tmp: Path, timeout: float = 1500) -> RaspiRun:
    """Boot a copy of the image as a Pi 3 until the agent's unit is active; QEMU is stopped on return.

    Kernel, initramfs (as config.txt names them), the Pi 3 device tree and cmdline.txt come from
    the card's FAT partition; QEMU loads them (it does not run the GPU firmware, which on a Pi reads
    config.txt and does the same). The console is cmdline.txt's own, the mini UART ttyS1: QEMU's
    second serial port (the PL011 is the Bluetooth UART on a Pi 3).
    """
    qemu_bin = qemu_binary()
    offset = int(image.info["boot_partition_offset"])  # type: ignore[arg-type]
    disk = copy_image(image, tmp)
    assert disk.stat().st_size < SD_BYTES
    write_boot_file(disk, offset, "crowdfl.toml", offline_agent_config(seed=3), tmp)
    subprocess.run(["truncate", "-s", str(SD_BYTES), str(disk)], check=True)  # a 2 GiB card
    boot = tmp / "boot"
    boot.mkdir()
    config = read_boot_file(disk, offset, "config.txt", boot / "config.txt").read_text()
    kernel_name = re.search(r"^kernel=(\S+)", config, re.M)
    initrd_name = re.search(r"^initramfs (\S+)", config, re.M)
    assert kernel_name and initrd_name, config
    kernel = read_boot_file(disk, offset, kernel_name.group(1), boot / "kernel")
    initrd = read_boot_file(disk, offset, initrd_name.group(1), boot / "initrd")
    dtb = read_boot_file(disk, offset, "bcm2837-rpi-3-b.dtb", boot / "pi3.dtb")
    cmdline = read_boot_file(disk, offset, "cmdline.txt", boot / "cmdline.txt").read_text().strip()
    # cmdline.txt as the firmware passes it, plus: no hanging on a panic, and a health line every 15 s
    append = f"{cmdline} panic=-1 systemd.show_status=1 systemd.wants=crowdfl-health.service"
    console_path = tmp / "console.log"
    cmd = [
        qemu_bin, "-M", "raspi3b", "-display", "none", "-monitor", "none",
        "-serial", "null", "-serial", f"file:{console_path}", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd), "-dtb", str(dtb), "-append", append,
        "-drive", f"file={disk},format=raw,if=sd,cache=unsafe",
    ]
    qemu: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        with (tmp / "qemu.log").open("wb") as qemu_log:
            qemu = subprocess.Popen(cmd, stdout=qemu_log, stderr=subprocess.STDOUT)
        console = Console(console_path, qemu)
        console.wait_for(re.compile(r"Machine model: Raspberry Pi 3 Model B"), timeout=300)
        grown = console.wait_for(re.compile(r"crowdfl-growroot: root (\S+) grown from (\d+) to (\d+) bytes"), timeout)
        keys = DeviceKeys.parse(console.wait_for(DEVICE_LINE, timeout=timeout).group(1))

        def active(m: re.Match[str]) -> bool:
            return health_fields(m.group(1)).get("state") == "active"

        health = health_fields(console.wait_for(HEALTH, timeout, accept=active).group(1))
        agent_active_s = time.monotonic() - t0

        def multi_user(m: re.Match[str]) -> bool:
            f = health_fields(m.group(1))
            return f.get("state") == "active" and f.get("multi_user") == "active"

        # the agent's unit can be active before multi-user.target is (systemd-networkd-wait-online
        # holds it up to 30 s on raspi3b, which has no network); the health line reports the target's
        # state, since systemd stops printing "Reached target" on a console that a getty owns
        health = health_fields(console.wait_for(HEALTH, timeout, accept=multi_user).group(1))
        text = console.text()
        startup = STARTUP.search(text)
        return RaspiRun(int(grown.group(2)), int(grown.group(3)), keys, health, agent_active_s,
                        startup.group(0) if startup else None, cmdline, text)
    finally:
        if qemu is not None:
            stop_process(qemu)


def summary(run: VirtRun | RaspiRun) -> str:
    fields = {k: v for k, v in run.__dict__.items() if k not in ("console", "disk", "keys")}
    return json.dumps(fields, default=str)
