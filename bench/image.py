"""The SD-card image: build times, boot-to-agent times under QEMU, and the agent's memory on arm64.

    .venv/bin/python bench/image.py            # root; 2 virt boots per unit variant + 1 raspi3b boot
    .venv/bin/python bench/image.py --quick    # 1 virt boot per variant, no raspi3b

1. Build. ``hardware/image/build.sh`` is run (it builds what its cache lacks) and then run again
   (everything cached). build.json gives the base stage's time when it was built from an empty
   cache (debootstrap, apt and pip under qemu-user) and the image stage's.
2. Boot under QEMU ``virt`` (TCG, cortex-a72 x2, 1 GiB), the image as it ships, through a round
   (``tests/hardware/boots.py``, the same flow as tests/hardware/test_qemu_system.py): keys on the
   console, the agent active with its usage log filled, its features at the edge. The agent's
   resident memory (VmRSS, and the peak VmHWM) is read by the image's crowdfl-health after the
   batch was stored. The control, booted in the same run, is the same image with a drop-in that
   unsets the unit's memory settings (``MEMORY_ENV``: glibc's malloc arenas, OpenBLAS's thread pool),
   so "shipped vs control" is the effect of those settings on arm64.
3. Boot as a Raspberry Pi 3 (``-M raspi3b``, kernel, initramfs, DTB and cmdline.txt from the card's
   FAT partition) until the agent's unit is active (no network on that board model).

Figures go to bench/results/image.json (``bench.results_io.write_result``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.hardware (the bench reuses the boot harness)

UNIT = ROOT / "hardware" / "systemd" / "crowdfl-agent.service"
BUILD = ROOT / "hardware" / "image" / "build.sh"
DROPIN = "/etc/systemd/system/crowdfl-agent.service.d/90-bench-control.conf"
SAMPLES_PER_ROUND = 16  # the default task: a 24-hour window every 25 hours; the 28-day backfill holds about 26
TARGET_RSS_MB = 64.0


def memory_env() -> list[str]:
    """The variables the shipped unit sets to keep the agent's memory down: the ``Environment=``
    line after the comment block that starts with ``# memory:``."""
    names: list[str] = []
    in_block = False
    for line in UNIT.read_text().splitlines():
        if line.startswith("# memory:"):
            in_block = True
        elif in_block and line.startswith("Environment="):
            names += [kv.split("=", 1)[0] for kv in line[len("Environment="):].split()]
            in_block = False
        elif in_block and not line.startswith("#"):
            in_block = False
    return names


def build() -> tuple[Path, dict[str, Any], float, bool]:
    t0 = time.monotonic()
    res = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, check=False)
    seconds = time.monotonic() - t0
    if res.returncode != 0:
        raise SystemExit(f"build.sh failed ({res.returncode}):\n{res.stderr[-4000:]}")
    directory = Path(res.stdout.strip().splitlines()[-1])
    cached = re.search(r"image \S+ cached", res.stderr) is not None
    return directory, json.loads((directory / "build.json").read_text()), seconds, cached


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one virt boot per variant, no raspi3b boot")
    ap.add_argument("--boots", type=int, default=None, help="virt boots per variant (default 2; --quick 1)")
    ap.add_argument("--no-raspi", action="store_true", help="skip the raspi3b boot")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/image.py builds the image: run it as root")
    boots = args.boots or (1 if args.quick else 2)

    from tests.hardware.boots import boot_raspi3b, boot_virt
    from tests.hardware.conftest import BuiltImage

    directory, info, first_s, was_cached = build()
    _, _, cached_s, cached_again = build()
    assert cached_again, "the second build.sh run rebuilt something"
    image = BuiltImage(directory, info, first_s)
    print(f"build: this run {first_s:.1f} s ({'cached' if was_cached else 'built'}); base stage "
          f"{info['base_build_seconds']} s when built from an empty cache; image stage {info['image_build_seconds']} s; "
          f"cached rerun {cached_s:.1f} s; image {info['image_bytes'] / 1e9:.2f} GB "
          f"({info['image_allocated_bytes'] / 2**20:.0f} MiB allocated)")

    env = memory_env()
    assert env, f"{UNIT} has no Environment= line under a '# memory:' comment"
    control = {DROPIN: f"# bench/image.py control: the unit without its memory settings\n[Service]\nUnsetEnvironment={' '.join(env)}\n"}
    runs: dict[str, list[dict[str, Any]]] = {"shipped": [], "control": []}
    for i in range(boots):
        for variant in ("shipped", "control"):  # interleaved: both see the same machine load
            with tempfile.TemporaryDirectory(prefix=f"bench-image-{variant}-") as tmp:
                run = boot_virt(image, Path(tmp), SAMPLES_PER_ROUND, seed=5 + i,
                                extra_root_files=control if variant == "control" else None)
            assert run.samples == SAMPLES_PER_ROUND and not run.rejections, (run.samples, run.rejections)
            row = {
                "keys_s": round(run.keys_s, 1), "agent_ready_s": round(run.ready_s, 1),
                "first_batch_after_task_s": round(run.first_batch_s, 1), "startup": run.startup,
                "rss_mb": int(run.after_health["rss_kb"]) / 1024, "hwm_mb": int(run.after_health["hwm_kb"]) / 1024,
                "cgroup_mb": int(run.after_health["cgroup_bytes"]) / 2**20,
            }
            runs[variant].append(row)
            print(f"virt {variant} #{i + 1}: {json.dumps(row)}")

    def agg(variant: str, key: str) -> dict[str, float]:
        return spread([r[key] for r in runs[variant]])

    figures: dict[str, Any] = {
        "build": {
            "base_stage_cold_s": info["base_build_seconds"], "image_stage_s": info["image_build_seconds"],
            "this_run_s": round(first_s, 1), "this_run_cached": was_cached, "cached_rerun_s": round(cached_s, 2),
            "image_bytes": info["image_bytes"], "image_allocated_bytes": info["image_allocated_bytes"],
            "rootfs_mb": info["rootfs_mb"], "venv_mb": info["venv_mb"], "kernel": info["kernel"],
            "image_key": info["image_key"], "base_key": info["base_key"],
        },
        "memory_env": env,
        "virt": {
            "machine": "qemu-system-aarch64 -M virt -cpu cortex-a72 -smp 2 -m 1024 (TCG)",
            "runs": runs,
            "agent_ready_s": agg("shipped", "agent_ready_s"),
            "keys_s": agg("shipped", "keys_s"),
            "first_batch_after_task_s": agg("shipped", "first_batch_after_task_s"),
            "rss_mb": agg("shipped", "rss_mb"), "hwm_mb": agg("shipped", "hwm_mb"),
            "control_rss_mb": agg("control", "rss_mb"), "control_hwm_mb": agg("control", "hwm_mb"),
        },
        "target_rss_mb": TARGET_RSS_MB,
    }
    figures["virt"]["rss_within_target"] = figures["virt"]["rss_mb"]["max"] <= TARGET_RSS_MB
    if not (args.quick or args.no_raspi):
        with tempfile.TemporaryDirectory(prefix="bench-image-raspi-") as tmp:
            r = boot_raspi3b(image, Path(tmp))
        figures["raspi3b"] = {
            "machine": "qemu-system-aarch64 -M raspi3b (TCG, 4 x cortex-a53, 1 GiB)",
            "agent_active_s": round(r.agent_active_s, 1), "startup": r.startup,
            "rss_mb": int(r.health["rss_kb"]) / 1024, "root_grown_to_bytes": r.grown_to,
        }
        print(f"raspi3b: {json.dumps(figures['raspi3b'])}")
    v = figures["virt"]
    print(f"\nagent RSS on arm64 (virt, after its batch): {v['rss_mb']['mean']:.1f} MB "
          f"({v['rss_mb']['min']:.1f}-{v['rss_mb']['max']:.1f}, n={v['rss_mb']['n']}) with {', '.join(env)} vs "
          f"{v['control_rss_mb']['mean']:.1f} MB ({v['control_rss_mb']['min']:.1f}-{v['control_rss_mb']['max']:.1f}) "
          f"without; peak {v['hwm_mb']['mean']:.1f} vs {v['control_hwm_mb']['mean']:.1f} MB; target <= {TARGET_RSS_MB:.0f} MB")

    from bench.results_io import write_result

    print(f"wrote {write_result('image', figures, quick=args.quick)}")


if __name__ == "__main__":
    main()
