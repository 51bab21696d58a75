"""One home for the benches' committed figures: bench/results/<name>.json.

Every bench calls :func:`write_result` with its figures; the file records the command that made
them, when, on what machine and with which package versions, so a figure quoted in the README can
be traced to the run that produced it (tests/test_readme_figures.py checks the quotes).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

_PACKAGES = ("numpy", "tensorflow-cpu", "ai-edge-litert", "web3", "py-evm", "cryptography",
             "paho-mqtt", "SQLAlchemy", "flwr", "scikit-learn")


def _versions() -> dict[str, str]:
    found: dict[str, str] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _machine() -> dict[str, Any]:
    mem_kb = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
                    break
    except OSError:
        pass
    return {
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "mem_gib": round(mem_kb / 2**20, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def write_result(name: str, figures: dict[str, Any], *, quick: bool = False,
                 results_dir: Path | None = None) -> Path:
    """Write ``figures`` to ``bench/results/<name>.json`` (``<name>.quick.json`` for --quick runs,
    which are not committed) and return the path."""
    out_dir = results_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (f"{name}.quick.json" if quick else f"{name}.json")
    record = {
        "bench": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": quick,
        "machine": _machine(),
        "versions": _versions(),
        "figures": figures,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
