"""Several light emulated devices at once: the image's arm64 Python under qemu-user.

Each device is the agent from the image's venv (``/opt/crowdfl/venv``) in a chroot of the image's
root file system, run by ``qemu-aarch64-static`` with its own state directory: it generates its
keys (``provision``), is registered from the public keys it printed, logs a simulated household,
and sends its round's noisy features to one edge server through the host's MQTT broker.

Why a chroot and not ``qemu-aarch64-static -L rootfs``: with ``-L`` every path missing from the
rootfs falls through to the host, LiteRT's cpuinfo then reads the host's (x86) sysfs CPU lists,
and ``Interpreter(...)`` dies with SIGSEGV (QEMU 7.2). Each device gets a private mount
namespace (``unshare``) in which its own directory is bind-mounted on ``/mnt`` and a tmpfs on
``/tmp``, so the cached rootfs is shared read-only by all of them and nothing leaks to the host's
mounts. No binfmt_misc: QEMU runs Python directly (the agent starts no other programs).
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.hardware.conftest import BuiltImage
from tests.hardware.hostside import DeviceKeys, HostSide
from tests.support.realparts import find_executable

pytestmark = [pytest.mark.realpart, pytest.mark.slow]

DEVICES = 3
SAMPLES_PER_ROUND = 16  # the default task: a 24-hour window every 25 hours; the 28-day backfill holds about 26


CHROOT_SCRIPT = """
r=$1; d=$2; shift 2
mount --bind "$d" "$r/mnt"
mount -t tmpfs -o size=64m tmpfs "$r/tmp"
exec env -i PATH=/usr/bin:/bin LC_ALL=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \\
    /usr/sbin/chroot "$r" /mnt/qemu-aarch64-static -0 /opt/crowdfl/venv/bin/python /usr/bin/python3.11 \\
    -m agent.cli --config /mnt/agent.toml "$@"
"""


def agent_command(image: BuiltImage, device_dir: Path, *args: str) -> list[str]:
    """``crowdfl-agent --config /mnt/agent.toml ARGS`` from the image, under qemu-user.

    The venv's ``bin/python`` is a symlink to ``/usr/bin/python3``: QEMU runs the interpreter and
    gets the venv path as argv[0] (``-0``), from which Python finds ``pyvenv.cfg`` as on the
    device. Every process in the chain ``exec``s, so the returned command's PID is QEMU's.
    """
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", CHROOT_SCRIPT, "chroot",
            str(image.rootfs), str(device_dir), *args]


def usage_reports(state_dir: Path) -> int:
    path = state_dir / "usage.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM reports").fetchone()[0])
    except sqlite3.Error:
        return 0


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def test_emulated_devices_deliver_all_batches(arm64_image: BuiltImage, tmp_path: Path) -> None:
    host = HostSide(tmp_path / "host", samples_per_round=SAMPLES_PER_ROUND)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        dirs: list[Path] = []
        keys: list[DeviceKeys] = []
        t0 = time.monotonic()
        qemu = find_executable("qemu-aarch64-static")
        assert qemu is not None
        for i in range(DEVICES):
            d = tmp_path / f"device-{i}"
            d.mkdir()
            shutil.copy(qemu, d / "qemu-aarch64-static")
            # paths as the device sees them: its directory is /mnt in its chroot
            (d / "agent.toml").write_text(host.agent_config("127.0.0.1", host.broker.port, host.api.url, seed=i,
                                                           state_dir="/mnt/state", resend_after_s=10.0))
            out = subprocess.run(agent_command(arm64_image, d, "provision"),
                                 capture_output=True, text=True, timeout=300, check=False)
            assert out.returncode == 0, out.stderr
            keys.append(DeviceKeys.parse(out.stdout))
            dirs.append(d)
        provision_s = (time.monotonic() - t0) / DEVICES
        host.register(keys)

        t_start = time.monotonic()
        for i, d in enumerate(dirs):
            logs.append(tmp_path / f"device-{i}.log")
            with logs[-1].open("wb") as log:
                procs.append(subprocess.Popen(agent_command(arm64_image, d, "run"), stdout=log, stderr=subprocess.STDOUT))
        # The agent's first poll of its (simulated) plugs fills 28 days of usage; a round that
        # arrives before it finds no samples, so wait for every log to have its history.
        deadline = time.monotonic() + 600
        while not all(usage_reports(d / "state") > 0 for d in dirs):
            assert all(p.poll() is None for p in procs), [lg.read_text()[-2000:] for lg in logs]
            assert time.monotonic() < deadline, "usage logs still empty after 600 s"
            time.sleep(1)
        ready_s = time.monotonic() - t_start

        host.publish_task()
        first_s = host.wait_for_batches({k.node_id for k in keys}, timeout=900,
                                        alive=lambda: all(p.poll() is None for p in procs))
        rss = [peak_rss_kb(p.pid) for p in procs]

        # every batch arrived whole, and nothing was rejected
        assert host.devices_with_batches() == {k.node_id for k in keys}
        assert host.edge.store.counts()["samples"] == DEVICES * SAMPLES_PER_ROUND
        assert not host.edge.store.rejection_counts()
        assert not host.edge.ingestor.stats.rejected
        print(
            f"\nqemu-user: {DEVICES} arm64 agents; provision {provision_s:.1f} s each; usage logs ready after "
            f"{ready_s:.1f} s; all batches at the edge {first_s:.1f} s after the task was published; "
            f"peak RSS per emulated agent (qemu + guest) {[r // 1024 for r in rss]} MB"
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=60))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        host.close()
    # SIGTERM: each agent flushed its spool and closed its databases
    for code, log in zip(codes, logs, strict=True):
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert "agent stopped cleanly" in text, text[-3000:]
