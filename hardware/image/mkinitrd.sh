#!/usr/bin/env bash
# The image's initramfs, assembled on the build host (no emulation, no initramfs-tools): a static
# arm64 busybox, the kernel modules needed to reach the root file system, and /init
# (initramfs-init). One initramfs serves QEMU's virt machine and the Raspberry Pis (the same
# Debian kernel): build.sh installs it as /boot/initrd.img-<version> in the image, whence
# raspi-firmware's kernel hook copies it to the FAT partition.
#
#   mkinitrd.sh EXTRA_DIR OUT_DIR
#
# EXTRA_DIR holds the Debian arm64 kernel and busybox-static .debs that base.sh downloaded.
# Writes OUT_DIR/vmlinuz, OUT_DIR/initrd.gz, OUT_DIR/kernel-version and OUT_DIR/modules (the
# modules it holds, in load order). Host tools only: dpkg-deb, cpio, gzip and python3.
set -euo pipefail

EXTRA=$1
OUT=$2
HERE=$(cd "$(dirname "$0")" && pwd)
# Modules in load order (their dependencies are added first; built-ins need nothing):
# - ext4 (+ crc32c, which it loads by name, not as a module dependency) for the root, vfat + code
#   pages for the boot partition;
# - QEMU virt: virtio disk/net/rng on PCI and MMIO, the PL031 RTC (the guest's clock);
# - Raspberry Pi SD card: sdhci-iproc (Pi 4's emmc2 and the Pi 3's Arasan SDHCI), the bcm2835 SD
#   host (Pi 3's card slot, drivers/mmc/host/bcm2835.ko), the fixed and GPIO regulators the Pi 4's
#   card supply and I/O voltage hang on. mmc_core/mmc_block, pinctrl, clocks, DMA, mailbox and
#   the firmware interface are built into Debian's arm64 kernel.
# A name with a "/" is a path under lib/modules/<version>/ (for names that are not unique).
WANTED=(ext4 crc32c_generic vfat nls_cp437 nls_ascii nls_utf8
        virtio_pci virtio_mmio virtio_blk virtio_net virtio_rng rtc-pl031
        kernel/drivers/regulator/fixed.ko gpio-regulator sdhci-iproc kernel/drivers/mmc/host/bcm2835.ko)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$(ls "$EXTRA"/linux-image-*.deb)" "$work/k"
dpkg-deb -x "$(ls "$EXTRA"/busybox-static_*.deb)" "$work/bb"
kver=$(ls "$work/k/lib/modules")
mkdir -p "$OUT" "$work/root/bin" "$work/root/lib/modules" "$work/root/proc" "$work/root/sys" "$work/root/dev"
cp "$work/k/boot/vmlinuz-$kver" "$OUT/vmlinuz"
cp "$work/bb/bin/busybox" "$work/root/bin/busybox"
install -m 0755 "$HERE/initramfs-init" "$work/root/init"

# Resolve the wanted modules and their dependencies (dependencies first); built-ins need nothing.
# The .deb has no modules.dep (depmod makes it on install), so read each module's "depends="
# from its ELF .modinfo section.
python3 - "$work/k/lib/modules/$kver" "${WANTED[@]}" >"$work/order" <<'PY'
import struct
import sys
from pathlib import Path

base = Path(sys.argv[1])


def norm(name: str) -> str:
    return name.split(".ko")[0].replace("-", "_")


def depends(path: Path) -> list[str]:
    """The "depends=" entry of a module's .modinfo (ELF64 little-endian, as arm64 is)."""
    data = path.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]
    for name, _type, _flags, _addr, off, size in sections:
        if data[names_off + name:].split(b"\0", 1)[0] == b".modinfo":
            for entry in data[off:off + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [d for d in entry[8:].decode().split(",") if d]
    return []


by_name = {norm(p.name): p for p in (base / "kernel").rglob("*.ko")}
builtin = {norm(Path(p).name) for p in (base / "modules.builtin").read_text().split()}
order: list[str] = []


def add(name: str) -> None:
    path = by_name[name]
    rel = str(path.relative_to(base))
    if rel in order:
        return
    for dep in depends(path):
        add(norm(dep))
    order.append(rel)


dups = {}
for p in (base / "kernel").rglob("*.ko"):
    dups.setdefault(norm(p.name), []).append(p)
for wanted in sys.argv[2:]:
    if "/" in wanted:
        path = base / wanted
        if not path.is_file():
            sys.exit(f"mkinitrd: no module {wanted}")
        for dep in depends(path):
            add(norm(dep))
        rel = str(path.relative_to(base))
        if rel not in order:
            order.append(rel)
        continue
    key = norm(wanted)
    if key in by_name:
        if len(dups[key]) > 1:
            sys.exit(f"mkinitrd: {wanted} names {len(dups[key])} modules: give its path")
        add(key)
    elif key not in builtin:
        sys.exit(f"mkinitrd: module {wanted} is neither a module nor built into the kernel")
print("\n".join(order))
PY
while read -r m; do
    mkdir -p "$work/root/lib/modules/$(dirname "$m")"
    cp "$work/k/lib/modules/$kver/$m" "$work/root/lib/modules/$m"
done <"$work/order"
case $(head -n1 "$work/order") in *.ko.xz|*.ko.zst|*.ko.gz) echo "mkinitrd: compressed modules are not supported" >&2; exit 1 ;; esac
cp "$work/order" "$work/root/modules.order"
(cd "$work/root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) | gzip -9n >"$OUT/initrd.gz"
printf '%s\n' "$kver" >"$OUT/kernel-version"
cp "$work/order" "$OUT/modules"
