"""What hardware/image/build.sh promises about the SD-card image, checked on the built files.

No emulation here (the QEMU tests boot it): the partition table, the two file systems' labels,
the boot partition's template, the device venv without TensorFlow, the enabled units, a fresh
machine id per device, none of the build host's CAs or resolver left behind, and the cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.hardware.conftest import BUILD, BuiltImage

pytestmark = [pytest.mark.realpart, pytest.mark.slow]


def run(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True,
                          env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout


def test_partition_table_and_file_systems(arm64_image: BuiltImage) -> None:
    img, info = arm64_image.image, arm64_image.info
    table = json.loads(run("sfdisk", "--json", str(img)))["partitiontable"]
    assert table["label"] == "dos"  # the Pi firmware reads MBR only
    boot, root = table["partitions"]
    assert (boot["type"], boot.get("bootable")) == ("c", True)
    assert root["type"] == "83"
    assert boot["start"] * 512 == info["boot_partition_offset"]
    assert root["start"] * 512 == info["root_partition_offset"]
    assert (root["start"] + root["size"]) * 512 == img.stat().st_size
    # ext4 root, labelled for the fstab and the initramfs
    out = subprocess.run(["blkid", "-p", "-O", str(info["root_partition_offset"]), "-o", "export", str(img)],
                         capture_output=True, text=True, check=False).stdout
    assert "TYPE=ext4" in out and "LABEL=CROWDFLROOT" in out, out
    # FAT boot partition with the manufacturer's template, read without mounting
    listing = run("mdir", "-b", "-i", f"{img}@@{info['boot_partition_offset']}", "::/")
    assert "crowdfl.toml.example" in listing.lower() and "readme.txt" in listing.lower(), listing
    # the Raspberry Pi boot chain (Debian's raspi-firmware + linux-image-arm64): GPU firmware for the
    # Pi 3 (bootcode.bin, start.elf) and Pi 4 (start4.elf), device trees, kernel, initrd, config
    names = {Path(line).name for line in listing.split()}
    pi = {"bootcode.bin", "start.elf", "fixup.dat", "start4.elf", "fixup4.dat", "config.txt", "cmdline.txt",
          "bcm2837-rpi-3-b.dtb", "bcm2837-rpi-3-b-plus.dtb", "bcm2711-rpi-4-b.dtb",
          str(info["pi_kernel"]), str(info["pi_initrd"])}
    assert pi <= names, sorted(pi - names)
    cmdline = run("mtype", "-i", f"{img}@@{info['boot_partition_offset']}", "::/cmdline.txt")
    assert "root=LABEL=CROWDFLROOT" in cmdline and "rootwait" in cmdline and "console=ttyS1,115200" in cmdline, cmdline
    assert "cma=" not in cmdline, cmdline  # raspi-firmware's cma=64M renders a Pi 4 unbootable
    config = run("mtype", "-i", f"{img}@@{info['boot_partition_offset']}", "::/config.txt")
    assert "arm_64bit=1" in config and f"kernel={info['pi_kernel']}" in config, config
    assert f"initramfs {info['pi_initrd']}" in config, config
    # the initramfs on the card is the one assembled on the host (busybox + modules), not
    # initramfs-tools', and QEMU's virt boot uses the very same kernel and initramfs
    boot_dir = Path(str(img) + ".boot-check")
    boot_dir.mkdir(exist_ok=True)
    try:
        for name, beside in ((info["pi_initrd"], arm64_image.initrd), (info["pi_kernel"], arm64_image.kernel)):
            run("mcopy", "-n", "-i", f"{img}@@{info['boot_partition_offset']}", f"::/{name}", str(boot_dir / "f"))
            assert (boot_dir / "f").read_bytes() == beside.read_bytes(), name
    finally:
        for f in boot_dir.iterdir():
            f.unlink()
        boot_dir.rmdir()
    initrd_files = subprocess.run(f"zcat {arm64_image.initrd} | cpio -it --quiet", shell=True, check=True,
                                  capture_output=True, text=True).stdout.split()
    modules = {Path(f).name for f in initrd_files if f.endswith(".ko")}
    # the Pi 3 card slot (bcm2835 sdhost), Pi 4 emmc2 (sdhci-iproc), virtio for QEMU, ext4
    assert {"bcm2835.ko", "sdhci-iproc.ko", "virtio_blk.ko", "ext4.ko", "fixed.ko"} <= modules, sorted(modules)
    assert {"init", "bin/busybox"} <= set(initrd_files), initrd_files
    assert "LABEL=CROWDFLBOOT" in subprocess.run(
        ["blkid", "-p", "-O", str(info["boot_partition_offset"]), "-o", "export", str(img)],
        capture_output=True, text=True, check=False).stdout
    # the image is sparse: most of the root partition's headroom takes no space
    assert info["image_allocated_bytes"] < info["image_bytes"]  # type: ignore[operator]


def test_root_file_system_holds_the_agent_and_its_boot_chain(arm64_image: BuiltImage) -> None:
    r = arm64_image.rootfs
    site = next((r / "opt/crowdfl/venv/lib").glob("python3.*/site-packages"))
    names = {p.name.lower() for p in site.iterdir()}
    assert {"agent", "crowdfl", "ai_edge_litert", "numpy", "paho"} <= names
    assert not any(n.startswith(("tensorflow", "keras", "web3")) for n in names), sorted(names)
    # arm64 binaries (the machine this runs on is x86_64)
    assert b"\xb7\x00" == (r / "usr/bin/python3.11").read_bytes()[18:20]
    # the shipped unit, unchanged, enabled; first-boot provisioning before it
    wants = r / "etc/systemd/system/multi-user.target.wants"
    for unit in ("crowdfl-agent.service", "crowdfl-firstboot.service", "systemd-networkd.service"):
        assert (wants / unit).is_symlink(), unit
    repo = Path(__file__).resolve().parents[2]
    assert (r / "etc/systemd/system/crowdfl-agent.service").read_text() == \
        (repo / "hardware/systemd/crowdfl-agent.service").read_text()
    assert "After=crowdfl-firstboot.service" in (r / "etc/systemd/system/crowdfl-agent.service.d/10-image.conf").read_text()
    groups = {line.split(":")[0] for line in (r / "etc/group").read_text().splitlines()}
    assert {"gpio", "i2c", "dialout"} <= groups  # the unit's SupplementaryGroups
    assert "LABEL=CROWDFLROOT" in (r / "etc/fstab").read_text()
    # every device makes its own machine id and keys: none are baked in
    assert (r / "etc/machine-id").read_text() == "uninitialized\n"
    assert not (r / "var/lib/crowdfl-agent").exists() and not (r / "var/lib/private/crowdfl-agent").exists()
    # nothing of the build host: its resolver, its locally added CAs
    assert os.readlink(r / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"
    bundle = (r / "etc/ssl/certs/ca-certificates.crt").read_text()
    for ca in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        body = "".join(ca.read_text().split("-----")[2].split())
        assert body[:200] not in "".join(bundle.split()), f"build host CA {ca.name} left in the image"
    assert not list((r / "usr/local/share/ca-certificates").iterdir())
    # QEMU's kernel + initramfs sit beside the image, not in it
    assert arm64_image.kernel.stat().st_size > 5_000_000 and arm64_image.initrd.stat().st_size > 100_000
    # the Pi kernel is installed (so kernel updates run raspi-firmware's hook); its boot copy is on
    # the FAT partition, mounted over the empty /boot/firmware
    assert list((r / "boot").glob("vmlinuz-*-arm64")) and not list((r / "boot/firmware").iterdir())
    assert (wants / "crowdfl-growroot.service").is_symlink()
    # SSH is off unless the boot partition brings a key, and no host keys are shared between cards
    assert not (wants / "ssh.service").exists() and not list((r / "etc/ssh").glob("ssh_host_*"))
    assert (r / "usr/sbin/wpa_supplicant").exists() and (r / "usr/bin/growpart").exists()
    # the kernel's initramfs in /boot is the image's; update-initramfs is back for kernel updates
    kver = str(arm64_image.info["kernel"])
    assert (r / f"boot/initrd.img-{kver}").read_bytes() == arm64_image.initrd.read_bytes()
    assert (r / "usr/sbin/update-initramfs").read_bytes().startswith(b"#!/bin/sh")
    assert b"skipped in the image build" not in (r / "usr/sbin/update-initramfs").read_bytes()
    assert not (r / "usr/sbin/update-initramfs.distrib").exists()


def test_a_second_build_comes_from_the_cache(arm64_image: BuiltImage) -> None:
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=600, check=True)
    seconds = time.monotonic() - t0
    assert Path(res.stdout.strip()) == arm64_image.directory
    assert "cached" in res.stderr
    assert seconds < 60, f"cached build took {seconds:.0f} s"
    print(f"\nimage: {json.dumps(arm64_image.info)}; cached rebuild {seconds:.1f} s")
