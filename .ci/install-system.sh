#!/usr/bin/env bash
# Install the Debian 12 packages that the real-part tests need, idempotently, as root.
#
#   mosquitto, mosquitto-clients  broker + mosquitto_passwd   (tests/support/mosquitto.py)
#   postgresql                    initdb/pg_ctl for a throwaway cluster (tests/support/postgres.py)
#   openssl                       test CA and certificates
#   systemd                       systemd-analyze verify/security (tests/test_systemd_units.py)
#   qemu-system-arm qemu-user-static debootstrap binfmt-support e2fsprogs fdisk cpio dosfstools
#   mtools                        the arm64 SD-card image and emulated devices (hardware/image/,
#                                 tests/hardware/); no ipxe-qemu, so QEMU runs need -net none or
#                                 an explicit -netdev (efi-virtio.rom)
#   chromium, chromium-driver     headless browser for the dashboard tests (tests/coordinator/test_dashboard.py)
#
# The tests start their own broker and database on free loopback ports. Debian's packages
# would also start a system-wide mosquitto on 0.0.0.0:1883 and a "15/main" PostgreSQL cluster
# on 5432; this script keeps them from starting during the install (policy-rc.d) and stops and
# disables them if they run anyway, so nothing system-wide is left listening.
set -euo pipefail

PACKAGES=(mosquitto mosquitto-clients postgresql openssl systemd chromium chromium-driver
          qemu-system-arm qemu-user-static debootstrap binfmt-support e2fsprogs fdisk cpio dosfstools mtools)

log() { printf 'install-system: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    log "must run as root"
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    # Deny service starts while dpkg configures the packages (exit 101 = "action forbidden").
    # Respect a policy-rc.d that is already there (Docker images ship one that does the same).
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# temporary, from crowdfl .ci/install-system.sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    log "all packages already installed: ${PACKAGES[*]}"
fi

# Stop and disable the system-wide instances if anything started them (a host booted with
# systemd enables both units on install; a later boot would start them).
if [[ -d /run/systemd/system ]]; then
    systemctl disable --now mosquitto.service postgresql.service >/dev/null 2>&1 || true
else
    if [[ -f /run/mosquitto/mosquitto.pid ]] && kill -0 "$(cat /run/mosquitto/mosquitto.pid)" 2>/dev/null; then
        log "stopping the system mosquitto"
        /etc/init.d/mosquitto stop || true
    fi
fi
if command -v pg_lsclusters >/dev/null 2>&1; then
    # Columns: Ver Cluster Port Status Owner Data-directory Log-file
    pg_lsclusters --no-header 2>/dev/null | while read -r ver cluster _port status _rest; do
        if [[ $status == online* ]]; then
            log "stopping system PostgreSQL cluster $ver/$cluster"
            pg_ctlcluster "$ver" "$cluster" stop || true
        fi
    done
fi

# Report (do not fail on) anything still listening on the default ports.
if command -v ss >/dev/null 2>&1; then
    busy=$(ss -Hltn '( sport = :1883 or sport = :8883 or sport = :5432 )' || true)
    if [[ -n $busy ]]; then
        log "warning: something still listens on a default MQTT/PostgreSQL port:"
        printf '%s\n' "$busy" >&2
    fi
fi

for tool in mosquitto mosquitto_passwd openssl systemd-analyze; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x /usr/sbin/$tool ]] || { log "missing after install: $tool"; exit 1; }
done
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || { log "missing after install: initdb"; exit 1; }
log "ok"
