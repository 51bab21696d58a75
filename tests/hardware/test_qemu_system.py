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
import time
from pathlib import Path

import pytest

from tests.hardware.boots import MTOOLS_ENV, RELAY, boot_virt
from tests.hardware.conftest import BuiltImage
from tests.hardware.hostside import DeviceKeys

pytestmark = [pytest.mark.realpart, pytest.mark.slow]

SAMPLES_PER_ROUND = 16  # the default task: a 24-hour window every 25 hours; the 28-day backfill holds about 26


def test_image_boots_and_its_agent_reaches_the_edge(arm64_image: BuiltImage, tmp_path: Path) -> None:
    run = boot_virt(arm64_image, tmp_path, SAMPLES_PER_ROUND)
    # the shipped unit's sandbox ran it: a dynamic user (systemd's 61184-65519), not root
    assert 61184 <= int(run.ready_health["uid"]) <= 65519, run.ready_health
    assert run.samples == SAMPLES_PER_ROUND
    assert not run.rejections
    text = run.console
    assert f"agent {run.keys.node_id[:16]} running" in text, text[-4000:]
    assert re.search(r"round 1: released %d samples" % SAMPLES_PER_ROUND, text), text[-4000:]
    assert "Failed to start crowdfl" not in text, text[-4000:]
    # the initramfs the image build assembled loaded its modules without a failure
    assert "initramfs: insmod" not in text and "initramfs: root" not in text, text[-4000:]
    after = run.after_health
    print(
        f"\nqemu-system-aarch64 (TCG, cortex-a72 x2, 1 GiB): keys on the console {run.keys_s:.1f} s after start; "
        f"systemd: {run.startup or 'no Startup finished line'}; agent ready (usage log filled) "
        f"{run.ready_s:.1f} s; first batch at the edge {run.first_batch_s:.1f} s after the task was published, "
        f"{run.total_s:.1f} s after QEMU started; agent on arm64 (uid {after['uid']}): RSS {after['rss_kb']} kB, "
        f"peak {after['hwm_kb']} kB, cgroup {after['cgroup_bytes']} bytes"
    )
    # the card carries the same public keys for the manufacturer (read with mtools, no mount)
    card = subprocess.run(["mtype", "-i", f"{run.disk}@@{arm64_image.info['boot_partition_offset']}", "::/crowdfl-device.json"],
                          capture_output=True, text=True, check=True, env=MTOOLS_ENV)
    assert DeviceKeys.parse(card.stdout) == run.keys

    # no relay left behind (each exits when QEMU closes its connection)
    def relays() -> list[str]:
        return subprocess.run(["pgrep", "-f", str(RELAY)], capture_output=True, text=True).stdout.split()

    deadline = time.monotonic() + 30  # each relay exits on its own; a loaded machine may take a moment
    while (left := relays()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"guestfwd relays still running: {left}"
