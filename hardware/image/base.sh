#!/usr/bin/env bash
# Stage 1 of the SD-card image: an arm64 Debian bookworm root file system with the system
# packages, a venv holding the agent's third-party dependencies, and (kept outside the rootfs)
# a Debian arm64 kernel + busybox for booting it under QEMU.
#
#   base.sh ROOTFS_DIR EXTRA_DIR REQUIREMENTS_FILE CONSTRAINTS_FILE
#
# Slow (debootstrap's second stage, apt and pip all run under qemu-user emulation: ~8 min on
# 2 busy cores), so build.sh caches its result keyed by a hash of this file and the requirements,
# and rebuilds only when one of them changes. Needs root (debootstrap, chroot, mount in a
# private mount namespace) and binfmt_misc for aarch64 (build.sh enables it).
set -euo pipefail

ROOTFS=$1
EXTRA=$2
REQS=$3
CONSTRAINTS=$4

SUITE=bookworm
MIRROR=${CROWDFL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# systemd as init, networkd/resolved/timesyncd for the network (a Pi has no RTC), kmod for
# modules, python3-venv for the agent's venv. Nothing else: no ssh server, no desktop.
PACKAGES=(systemd systemd-sysv udev kmod dbus systemd-resolved systemd-timesyncd
          python3 python3-venv ca-certificates)
# What a Raspberry Pi boots: Debian's generic arm64 kernel (it carries the Broadcom device trees,
# bcm2837-rpi-3-b*.dtb, bcm2711-rpi-4-b.dtb, ...; no BCM2712, so no Pi 5) and the Pi's GPU firmware
# (raspi-firmware, non-free-firmware: bootcode.bin, start*.elf, fixup*.dat), whose kernel hook
# fills /boot/firmware with the firmware, the kernel, the initrd, the dtbs, config.txt and
# cmdline.txt. Plus Wi-Fi (wpasupplicant; the Pi 3/4 radios' firmware is firmware-brcm80211),
# growing the root partition on first boot (growpart + sfdisk) and an SSH server that stays off
# unless a key is given. initramfs-tools is installed so that a kernel update on the device makes
# its own initramfs (natively, in a minute); the image's first initramfs is NOT made here: running
# update-initramfs under qemu-user took > 45 min, so it is diverted to a no-op for the build and
# build.sh assembles the initramfs on the host (mkinitrd.sh: busybox + the kernel's modules).
PI_PACKAGES=(linux-image-arm64 initramfs-tools raspi-firmware firmware-brcm80211 wpasupplicant
             cloud-guest-utils fdisk openssh-server)

log() { printf 'base: %s\n' "$*" >&2; }

# Run a command in the arm64 chroot with /proc, /sys, /dev mounted in a private mount
# namespace (the mounts vanish with the namespace, even if the build is killed) and a clean
# environment.
in_chroot() {
    unshare --mount --propagation private -- /bin/sh -c '
        set -e
        r=$1; shift
        mount -t proc proc "$r/proc"
        mount -t sysfs sysfs "$r/sys"
        mount --rbind /dev "$r/dev"
        exec chroot "$r" /usr/bin/env -i HOME=/root LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
            PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
    ' in_chroot "$ROOTFS" "$@"
}

t0=$(date +%s)
log "debootstrap stage 1 ($SUITE arm64 minbase from $MIRROR)"
debootstrap --arch=arm64 --foreign --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >&2
log "debootstrap stage 2 under qemu-user ($(( $(date +%s) - t0 )) s so far)"
# debootstrap's second stage mounts /proc itself; run it in a private namespace all the same.
unshare --mount --propagation private -- chroot "$ROOTFS" /debootstrap/debootstrap --second-stage >&2

cat >"$ROOTFS/etc/apt/sources.list" <<SRC
deb $MIRROR $SUITE main non-free-firmware
deb $MIRROR $SUITE-updates main non-free-firmware
deb http://deb.debian.org/debian-security $SUITE-security main non-free-firmware
SRC
# Keep services from starting inside the chroot while packages are configured.
printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"

log "apt-get install ${PACKAGES[*]} ($(( $(date +%s) - t0 )) s so far)"
in_chroot apt-get update -qq >&2
in_chroot apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >&2
# systemd-resolved turned resolv.conf into a symlink to its (not running) stub: use the host's
# for the rest of the build; build.sh puts the symlink back.
rm -f "$ROOTFS/etc/resolv.conf"
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"

# The kernel command line the Pi firmware passes (cmdline.txt): root by label, so the same card
# boots whatever the SD controller's device name; the serial console of the Pi 3/4 GPIO header
# (the mini UART, ttyS1). CMA=0 leaves cma= off the command line: the hook decides "Pi 4 or not"
# by the machine it runs on (here: neither), and its cma=64M renders a Pi 4 unbootable (its own
# comment); the kernel's default CMA suits a headless board of either family.
mkdir -p "$ROOTFS/etc/default" "$ROOTFS/boot/firmware"
cat >"$ROOTFS/etc/default/raspi-firmware" <<'CFG'
# crowdfl image (hardware/image/base.sh); see the package's original for every option
ROOTPART="LABEL=CROWDFLROOT"
CONSOLES="tty0 ttyS1,115200"
CMA=0
CFG
printf 'net.ifnames=0\n' >"$ROOTFS/etc/default/raspi-extra-cmdline"
# update-initramfs -> a no-op while the packages are installed (see PI_PACKAGES above)
in_chroot dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs
printf '#!/bin/sh\necho "update-initramfs: skipped in the image build (build.sh makes the initramfs)"\n' \
    >"$ROOTFS/usr/sbin/update-initramfs"
chmod 0755 "$ROOTFS/usr/sbin/update-initramfs"
log "apt-get install ${PI_PACKAGES[*]} ($(( $(date +%s) - t0 )) s so far)"
in_chroot apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "${PI_PACKAGES[@]}" >&2
rm -f "$ROOTFS/usr/sbin/update-initramfs"
in_chroot dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs
[[ -x $ROOTFS/usr/sbin/update-initramfs ]] || { log "update-initramfs was not restored"; exit 1; }
for f in bootcode.bin start.elf fixup.dat start4.elf fixup4.dat; do
    [[ -s $ROOTFS/usr/lib/raspi-firmware/$f ]] || { log "raspi-firmware has no $f"; exit 1; }
done
# Every card gets its own SSH host keys (made on first boot, if SSH is enabled at all).
rm -f "$ROOTFS"/etc/ssh/ssh_host_*
in_chroot systemctl disable ssh.service >&2 2>/dev/null || true

# pip verifies TLS against the rootfs's CA bundle: trust the build host's locally added CAs
# (a TLS-intercepting proxy, for one) for the build only, by appending them to a copy of the
# bundle that is put back below (update-ca-certificates under emulation takes a minute).
bundle=$ROOTFS/etc/ssl/certs/ca-certificates.crt
cp -p "$bundle" "$bundle.crowdfl-orig"
for ca in /usr/local/share/ca-certificates/*.crt; do
    if [[ -e $ca ]]; then cat "$ca" >>"$bundle"; fi
done

log "venv + pip install of the agent's dependencies ($(( $(date +%s) - t0 )) s so far)"
in_chroot python3 -m venv /opt/crowdfl/venv
cp "$REQS" "$ROOTFS/tmp/requirements.txt"
cp "$CONSTRAINTS" "$ROOTFS/tmp/constraints.txt"
in_chroot /opt/crowdfl/venv/bin/pip install --no-cache-dir --disable-pip-version-check -q \
    -r /tmp/requirements.txt -c /tmp/constraints.txt >&2
in_chroot /opt/crowdfl/venv/bin/pip check >&2
rm -f "$ROOTFS/tmp/requirements.txt" "$ROOTFS/tmp/constraints.txt"

log "kernel + busybox for QEMU ($(( $(date +%s) - t0 )) s so far)"
kernel_pkg=$(in_chroot apt-cache depends linux-image-arm64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n $kernel_pkg ]] || { log "cannot resolve linux-image-arm64"; exit 1; }
mkdir -p "$ROOTFS/tmp/debs"
in_chroot /bin/sh -c "cd /tmp/debs && apt-get download -q $kernel_pkg busybox-static" >&2
mkdir -p "$EXTRA"
mv "$ROOTFS"/tmp/debs/*.deb "$EXTRA/"
rmdir "$ROOTFS/tmp/debs"
printf '%s\n' "$kernel_pkg" >"$EXTRA/kernel-package"
# The initramfs build.sh makes holds modules from this .deb: it must be the installed kernel.
installed=$(in_chroot dpkg-query -W -f '${Version}' "$kernel_pkg")
downloaded=$(dpkg-deb -f "$(ls "$EXTRA"/linux-image-*.deb)" Version)
[[ $installed == "$downloaded" ]] || { log "kernel $kernel_pkg: installed $installed, downloaded $downloaded"; exit 1; }

# Forget the build host: its CAs, its resolver, the apt lists and caches.
mv "$bundle.crowdfl-orig" "$bundle"
rm -f "$ROOTFS/usr/sbin/policy-rc.d"
in_chroot apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/debconf/*-old "$ROOTFS"/tmp/*
log "done in $(( $(date +%s) - t0 )) s"
