#!/usr/bin/env bash
# Build the crowdfl SD-card image for arm64 boards (Raspberry Pi 3/4/5 class): Debian bookworm,
# systemd, the agent in /opt/crowdfl/venv (no TensorFlow), crowdfl-agent.service enabled, and
# provisioning from the boot partition on first boot.
#
#   hardware/image/build.sh [--cache DIR] [--force]
#
# Prints the build directory on stdout (logs go to stderr). It holds:
#   crowdfl.img            the partitioned disk image (MBR: FAT32 "CROWDFLBOOT" with the Raspberry Pi
#                          firmware, kernel, initrd, device trees, config.txt and cmdline.txt; ext4 "CROWDFLROOT")
#   rootfs/                the root file system the image was made from (qemu-user runs it)
#   qemu/vmlinuz, qemu/initrd.gz   the same kernel and initramfs as on the FAT partition, for QEMU -M virt
#                          (qemu/modules: the modules the initramfs loads)
#   build.json             inputs' hash, timings and sizes
#
# Two cached stages under DIR (default $CROWDFL_IMAGE_CACHE or /var/cache/crowdfl-image):
#   base-<hash>   debootstrap + system packages, kernel and Pi firmware + the agent's pinned
#                 dependencies (base.sh; all under emulation: 20 min on 2 cores shared with heavy
#                 jobs, bench/image.py); keyed by base.sh, constraints.txt and the agent's
#                 requirements in setup.cfg
#   image-<hash>  base + the crowdfl wheel + units + overlay + the initramfs (mkinitrd.sh, on the
#                 host) + raspi-firmware's hook + the disk image (about 2 min); keyed by the base's
#                 hash, these scripts, the overlay, the agent unit and the sources
# A finished stage is reused as is; the two newest of each are kept.
#
# Needs root (debootstrap, chroot, unshare) and, for the emulated stages, binfmt_misc: it is
# mounted and qemu-aarch64 enabled for the build and restored afterwards. No loop devices and
# no mounts of the image: the file systems are made from directories (mke2fs -d, mtools) and
# partitioned in a plain file (sfdisk).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${CROWDFL_IMAGE_CACHE:-/var/cache/crowdfl-image}
FORCE=0
while (($#)); do
    case $1 in
        --cache) CACHE=$2; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { printf 'image: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, chroot)"
for tool in debootstrap qemu-aarch64-static update-binfmts unshare mke2fs mkfs.fat mcopy sfdisk cpio dpkg-deb python3; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || die "missing $tool (run .ci/install-system.sh)"
done
export PATH=$PATH:/usr/sbin:/sbin

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9  # one build at a time; a second caller waits and then finds the result cached
rm -rf "$CACHE"/*.tmp  # left by a build that was killed (we hold the lock: none is running)

# Same wrapper as base.sh: proc/sys/dev in a private mount namespace, clean environment.
in_chroot() {
    local root=$1; shift
    unshare --mount --propagation private -- /bin/sh -c '
        set -e
        r=$1; shift
        mount -t proc proc "$r/proc"
        mount -t sysfs sysfs "$r/sys"
        mount --rbind /dev "$r/dev"
        exec chroot "$r" /usr/bin/env -i HOME=/root LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
    ' in_chroot "$root" "$@"
}

# binfmt_misc: enable qemu-aarch64 for the emulated steps; put back what was found on exit. The
# state is machine-wide while caches are per directory, so builds with different caches share
# /run/lock/crowdfl-image-binfmt.*: "mutex" serialises changes, every build using binfmt holds
# "users" shared, the build that changed binfmt notes the undo steps in "restore", and whichever
# build leaves last (it alone can take "users" exclusively) runs them.
BINFMT_LOCK=${CROWDFL_BINFMT_LOCK:-/run/lock/crowdfl-image-binfmt}
BINFMT_DIR=${CROWDFL_BINFMT_DIR:-/proc/sys/fs/binfmt_misc}  # both overridable for tests/hardware/test_image_files.py
binfmt_held=0
cleanup_binfmt() {
    [[ $binfmt_held == 1 ]] || return 0
    flock -x 7
    if flock -n -x 8; then  # no other build is using binfmt
        if [[ -s $BINFMT_LOCK.restore ]]; then
            tac "$BINFMT_LOCK.restore" | while read -r step; do
                case $step in
                    disable) update-binfmts --disable qemu-aarch64 >&2 || true ;;
                    umount) umount "$BINFMT_DIR" || true ;;
                esac
            done
        fi
        rm -f "$BINFMT_LOCK.restore"
    fi
    flock -u 8
    flock -u 7
}
ensure_binfmt() {
    [[ $binfmt_held == 0 ]] || return 0
    local dir=$BINFMT_DIR
    mkdir -p "$(dirname "$BINFMT_LOCK")"
    exec 7>>"$BINFMT_LOCK.mutex" 8>>"$BINFMT_LOCK.users"
    flock -x 7
    flock -s 8
    binfmt_held=1
    if [[ ! -e $dir/register ]]; then
        mount -t binfmt_misc binfmt_misc "$dir"
        echo umount >>"$BINFMT_LOCK.restore"
    fi
    if [[ ! -e $dir/qemu-aarch64 ]] || ! grep -q '^enabled' "$dir/qemu-aarch64"; then
        update-binfmts --enable qemu-aarch64 >&2
        echo disable >>"$BINFMT_LOCK.restore"
    fi
    flock -u 7
}
tmp_dirs=()
trap 'cleanup_binfmt; for d in "${tmp_dirs[@]}"; do rm -rf "$d"; done' EXIT

hash_files() {  # sha256 over the paths (relative to REPO) and contents of the given files
    local f
    for f in "$@"; do
        printf '%s\0' "${f#"$REPO"/}"
        sha256sum <"$f"
    done | sha256sum | cut -c1-16
}

prune() {  # keep the two newest finished builds of a stage
    local stage=$1
    ls -1dt "$CACHE/$stage"-* 2>/dev/null | grep -v '\.tmp$' | tail -n +3 | while read -r old; do
        log "pruning old $old"
        rm -rf "$old"
    done
}

# --- stage 1: base -----------------------------------------------------------------------
reqs=$(mktemp); tmp_dirs+=("$reqs")
python3 - "$REPO/setup.cfg" >"$reqs" <<'PY'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
lines = cfg["options"]["install_requires"].splitlines() + cfg["options.extras_require"]["agent"].splitlines()
print("\n".join(sorted(l.strip() for l in lines if l.strip())))
PY
base_key=$( { hash_files "$HERE/base.sh" "$HERE/constraints.txt"; cat "$reqs"; } | sha256sum | cut -c1-16)
BASE=$CACHE/base-$base_key
t_base=0
if [[ $FORCE == 1 || ! -f $BASE/done ]]; then
    ensure_binfmt
    rm -rf "$BASE.tmp" "$BASE"
    mkdir -p "$BASE.tmp"
    log "building base $base_key (debootstrap + packages + venv under emulation: several minutes)"
    t=$(date +%s)
    bash "$HERE/base.sh" "$BASE.tmp/rootfs" "$BASE.tmp/extra" "$reqs" "$HERE/constraints.txt"
    t_base=$(( $(date +%s) - t ))
    printf '%s\n' "$t_base" >"$BASE.tmp/seconds"
    touch "$BASE.tmp/done"
    mv "$BASE.tmp" "$BASE"
    prune base
else
    log "base $base_key cached"
fi

# --- stage 2: image ----------------------------------------------------------------------
src_files=()
while IFS= read -r -d '' f; do src_files+=("$f"); done < <(
    cd "$REPO" && find crowdfl agent edge_server coordinator -name '*.py' -print0 | LC_ALL=C sort -z | sed -z "s|^|$REPO/|")
mapfile -d '' overlay_files < <(cd "$HERE" && find overlay -type f -print0 | LC_ALL=C sort -z | sed -z "s|^|$HERE/|")
image_key=$(
    { echo "$base_key"
      hash_files "$HERE/build.sh" "$HERE/mkinitrd.sh" "$HERE/initramfs-init" "$HERE/crowdfl.toml.example" \
          "$REPO/hardware/systemd/crowdfl-agent.service" "${overlay_files[@]}" \
          "$REPO/setup.cfg" "$REPO/pyproject.toml" "$REPO/README.md" "${src_files[@]}"
    } | sha256sum | cut -c1-16)
OUT=$CACHE/image-$image_key
if [[ $FORCE == 0 && -f $OUT/done ]]; then
    log "image $image_key cached"
    echo "$OUT"
    exit 0
fi
ensure_binfmt
t_image0=$(date +%s)
rm -rf "$OUT.tmp" "$OUT"
mkdir -p "$OUT.tmp"
R=$OUT.tmp/rootfs
log "image $image_key: copying base $base_key"
cp -a "$BASE/rootfs" "$R"

log "building the crowdfl wheel on the host (pure Python)"
src=$(mktemp -d); tmp_dirs+=("$src")
(cd "$REPO" && cp -r --parents setup.cfg pyproject.toml README.md crowdfl agent edge_server coordinator "$src/")
find "$src" -name '__pycache__' -prune -exec rm -rf {} +
# needs setuptools + wheel: the repo's .venv has them (CROWDFL_BUILD_PYTHON overrides)
build_py=${CROWDFL_BUILD_PYTHON:-$REPO/.venv/bin/python}
[[ -x $build_py ]] || build_py=python3
"$build_py" -m pip wheel -q --no-deps --no-build-isolation -w "$src/dist" "$src" >&2
wheel=$(ls "$src"/dist/crowdfl-*.whl)
cp "$wheel" "$R/tmp/"
log "pip install $(basename "$wheel")[agent] in the arm64 rootfs (offline: the base has its dependencies)"
in_chroot "$R" /opt/crowdfl/venv/bin/pip install -q --no-index --disable-pip-version-check \
    "/tmp/$(basename "$wheel")[agent]" >&2
in_chroot "$R" /opt/crowdfl/venv/bin/pip check >&2
# Prove the agent imports on arm64 without TensorFlow (LiteRT, numpy, paho, pycryptodome).
in_chroot "$R" /opt/crowdfl/venv/bin/python -c '
import importlib.util, agent.cli, crowdfl.front
from ai_edge_litert.interpreter import Interpreter
assert importlib.util.find_spec("tensorflow") is None, "TensorFlow in the device venv"
' >&2
rm -f "$R/tmp/"*.whl

log "units, overlay, first-boot provisioning"
install -m 0644 "$REPO/hardware/systemd/crowdfl-agent.service" "$R/etc/systemd/system/crowdfl-agent.service"
# root-owned whatever the checkout's owner; executables 0755, the rest 0644
(cd "$HERE/overlay" && find . -type f -print0) | while IFS= read -r -d '' f; do
    mode=0644; [[ -x $HERE/overlay/$f ]] && mode=0755
    install -D -o root -g root -m "$mode" "$HERE/overlay/$f" "$R/${f#./}"
done
install -m 0644 "$HERE/crowdfl.toml.example" "$R/opt/crowdfl/crowdfl.toml.example"
install -m 0644 "$REPO/README.md" "$R/opt/crowdfl/README.md"
mkdir -p "$R/boot/firmware" "$R/etc/crowdfl"
# The unit's SupplementaryGroups (Pi OS has them, plain Debian lacks gpio and i2c).
for g in gpio i2c dialout; do
    grep -q "^$g:" "$R/etc/group" || in_chroot "$R" groupadd --system "$g"
done
systemctl --root="$R" enable crowdfl-agent.service crowdfl-firstboot.service crowdfl-growroot.service \
    systemd-networkd.service systemd-resolved.service systemd-timesyncd.service >&2 2>/dev/null
printf 'crowdfl\n' >"$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tcrowdfl\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$R/etc/hosts"
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$R/etc/resolv.conf"
# Every device gets its own machine id on first boot (and systemd applies presets then).
printf 'uninitialized\n' >"$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
rm -rf "$R/tmp/"* "$R/var/tmp/"* "$R/var/log/"*.log "$R/var/cache/apt/"*.bin
find "$R/var/log" -type f -delete

log "kernel + initramfs (assembled on the host: busybox, modules, /init)"
bash "$HERE/mkinitrd.sh" "$BASE/extra" "$OUT.tmp/qemu"
kver=$(cat "$OUT.tmp/qemu/kernel-version")
[[ -f $R/boot/vmlinuz-$kver ]] || die "the rootfs has no kernel $kver (/boot: $(ls "$R/boot"))"
cmp -s "$R/boot/vmlinuz-$kver" "$OUT.tmp/qemu/vmlinuz" || die "the rootfs's kernel $kver differs from the .deb's"
install -m 0644 "$OUT.tmp/qemu/initrd.gz" "$R/boot/initrd.img-$kver"

# The Raspberry Pi boot files: raspi-firmware's kernel hook (the one a kernel update on the device
# runs) copies the firmware, the kernel, the initrd and the Broadcom device trees to /boot/firmware
# and writes config.txt and cmdline.txt there. They go on the FAT partition, which the device
# mounts over /boot/firmware, so the same hook keeps it current after a kernel update.
rm -rf "$R/boot/firmware" && mkdir -p "$R/boot/firmware"
for f in "$R"/usr/lib/raspi-firmware/*; do cp "$f" "$R/boot/firmware/"; done  # what its postinst does
in_chroot "$R" env DEB_MAINT_PARAMS=configure /etc/kernel/postinst.d/z50-raspi-firmware "$kver" >&2
bootfiles=$OUT.tmp/bootfiles
rm -rf "$bootfiles"
mv "$R/boot/firmware" "$bootfiles"
mkdir -p "$R/boot/firmware"
pi_kernel=vmlinuz-$kver
pi_initrd=initrd.img-$kver
for f in "$pi_kernel" "$pi_initrd" config.txt cmdline.txt bootcode.bin start.elf fixup.dat start4.elf fixup4.dat \
         bcm2837-rpi-3-b.dtb bcm2837-rpi-3-b-plus.dtb bcm2711-rpi-4-b.dtb; do
    [[ -s $bootfiles/$f ]] || die "raspi-firmware's hook did not produce /boot/firmware/$f"
done
cmp -s "$bootfiles/$pi_initrd" "$OUT.tmp/qemu/initrd.gz" || die "the FAT partition's initrd is not the one made here"
grep -q 'root=LABEL=CROWDFLROOT' "$bootfiles/cmdline.txt" || die "cmdline.txt does not boot LABEL=CROWDFLROOT: $(cat "$bootfiles/cmdline.txt")"
grep -q "^initramfs $pi_initrd" "$bootfiles/config.txt" || die "config.txt loads no initramfs: $(cat "$bootfiles/config.txt")"
if grep -q 'cma=' "$bootfiles/cmdline.txt"; then die "cmdline.txt sets cma= (renders a Pi 4 unbootable)"; fi

log "file systems and the partitioned image"
rootfs_mb=$(du -sm "$R" | cut -f1)
venv_mb=$(du -sm "$R/opt/crowdfl/venv" | cut -f1)
root_mb=$(( rootfs_mb * 13 / 10 + 256 ))    # headroom for the spool, usage log, apt upgrades
boot_mb=256
img=$OUT.tmp/crowdfl.img
mke2fs -q -t ext4 -L CROWDFLROOT -d "$R" -E root_owner=0:0 "$OUT.tmp/root.ext4" "${root_mb}M" >&2
mkfs.fat -F 32 -n CROWDFLBOOT -C "$OUT.tmp/boot.vfat" $(( boot_mb * 1024 )) >/dev/null
cat >"$OUT.tmp/README.txt" <<TXT
crowdfl boot partition. Put the agent configuration here as crowdfl.toml (see
crowdfl.toml.example) and, if the broker uses TLS with a private CA, its certificate as
crowdfl-ca.crt. Optional: wpa_supplicant.conf (Wi-Fi), ssh_authorized_keys (SSH, off
without it), crowdfl-mqtt.password or crowdfl-mqtt.crt + .key (MQTT credentials); each is moved
off this partition on boot. After the first boot, crowdfl-device.json holds the device's public keys.
TXT
MTOOLS_SKIP_CHECK=1 mcopy -i "$OUT.tmp/boot.vfat" "$OUT.tmp/README.txt" "$HERE/crowdfl.toml.example" ::/
MTOOLS_SKIP_CHECK=1 mcopy -s -i "$OUT.tmp/boot.vfat" "$bootfiles"/* ::/
rm -rf "$OUT.tmp/README.txt" "$bootfiles"
# MBR (the Pi firmware reads only MBR): 4 MiB aligned, FAT32 LBA first, root after it.
start1=8192; size1=$(( boot_mb * 2048 )); start2=$(( start1 + size1 )); size2=$(( root_mb * 2048 ))
truncate -s $(( (start2 + size2) * 512 )) "$img"
sfdisk -q "$img" >&2 <<SF
label: dos
unit: sectors
start=$start1, size=$size1, type=c, bootable
start=$start2, size=$size2, type=83
SF
dd if="$OUT.tmp/boot.vfat" of="$img" bs=1M seek=$(( start1 / 2048 )) conv=notrunc,sparse status=none
dd if="$OUT.tmp/root.ext4" of="$img" bs=1M seek=$(( start2 / 2048 )) conv=notrunc,sparse status=none
rm "$OUT.tmp/boot.vfat" "$OUT.tmp/root.ext4"

t_image=$(( $(date +%s) - t_image0 ))
python3 - "$OUT.tmp" <<PY
import json, os, sys
out = sys.argv[1]
st = os.stat(f"{out}/crowdfl.img")
info = {
    "image_key": "$image_key", "base_key": "$base_key",
    "base_build_seconds": int(open("$BASE/seconds").read()), "image_build_seconds": $t_image,
    "image_bytes": st.st_size, "image_allocated_bytes": st.st_blocks * 512,
    "rootfs_mb": $rootfs_mb, "venv_mb": $venv_mb, "root_partition_mb": $root_mb, "boot_partition_mb": $boot_mb,
    "boot_partition_offset": $start1 * 512, "root_partition_offset": $start2 * 512,
    "kernel": open(f"{out}/qemu/kernel-version").read().strip(), "kernel_package": open("$BASE/extra/kernel-package").read().strip(),
    "wheel": "$(basename "$wheel")",
    "pi_kernel": "$pi_kernel", "pi_initrd": "$pi_initrd",
}
json.dump(info, open(f"{out}/build.json", "w"), indent=2)
PY
touch "$OUT.tmp/done"
mv "$OUT.tmp" "$OUT"
prune image
log "image $image_key built in $t_image s (base: $(cat "$BASE/seconds") s when it was built): $(du -h --apparent-size "$OUT/crowdfl.img" | cut -f1) ($(du -h "$OUT/crowdfl.img" | cut -f1) allocated)"
echo "$OUT"
