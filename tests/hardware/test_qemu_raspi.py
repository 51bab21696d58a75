"""The SD-card image booted as a Raspberry Pi 3: ``qemu-system-aarch64 -M raspi3b`` (TCG).

Everything the board boots comes from the image's own FAT partition, read with mtools: the
kernel and the initramfs that raspi-firmware's hook put there (named by config.txt's ``kernel=``
and ``initramfs`` lines), the Pi 3 device tree (bcm2837-rpi-3-b.dtb) and the kernel command line
of cmdline.txt, unchanged. (QEMU loads them itself: it does not run the GPU firmware, start.elf,
which on a real Pi reads config.txt and does the same.) The console is the one cmdline.txt names,
the mini UART ``ttyS1`` (QEMU's second serial port; the PL011 is the Bluetooth UART on a Pi 3).
The image is the SD card, made 2 GiB (QEMU's SD model wants a power of two), so the first boot
also grows the root partition.

Checked: the initramfs loads the Pi's SD host drivers and finds the root file system on the card
by its label, systemd reaches multi-user, crowdfl-growroot grows the root to the card,
crowdfl-firstboot installs the configuration and generates the keys, and crowdfl-agent.service
runs under its sandbox (a dynamic user). QEMU's raspi3b has no network device the guest could
use (no USB Ethernet model), so the agent's traffic is proven by the ``-M virt`` boot
(test_qemu_system.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.hardware.boots import SD_BYTES, boot_raspi3b
from tests.hardware.conftest import BuiltImage

pytestmark = [pytest.mark.realpart, pytest.mark.slow]


def test_image_boots_as_a_raspberry_pi_3(arm64_image: BuiltImage, tmp_path: Path) -> None:
    b = boot_raspi3b(arm64_image, tmp_path)
    assert "root=LABEL=CROWDFLROOT" in b.cmdline and "console=ttyS1,115200" in b.cmdline, b.cmdline
    # the initramfs loaded the Pi's SD host drivers and found the root on the card (mmcblk0)
    assert "initramfs: insmod" not in b.console and "initramfs: root" not in b.console, b.console[-4000:]
    assert re.search(r"mmcblk0: mmc0:\S+ \S+ 2\.00 GiB", b.console), b.console[-6000:]
    assert re.search(r"EXT4-fs \(mmcblk0p2\): mounted", b.console), b.console[-6000:]
    assert b.grown_to > b.grown_from and b.grown_to > SD_BYTES * 0.8, (b.grown_from, b.grown_to)
    assert len(b.keys.node_id) == 64
    # multi-user.target reached, as the guest's systemd reports it (crowdfl-health), agent still active
    assert b.health["multi_user"] == "active" and b.health["state"] == "active", b.health
    assert 61184 <= int(b.health["uid"]) <= 65519, b.health  # the unit's DynamicUser sandbox
    assert "Failed to start crowdfl" not in b.console, b.console[-4000:]
    print(f"\nraspi3b: root grown {b.grown_from} -> {b.grown_to} bytes; agent active {b.agent_active_s:.0f} s "
          f"after QEMU started; {b.startup or 'no Startup finished line'}; agent RSS {b.health.get('rss_kb')} kB")
