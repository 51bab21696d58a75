"""The systemd units in hardware/systemd/: what they promise, checked two ways.

1. Statically (no systemd needed): the directives the deployment relies on are present.
2. With Debian's real ``systemd-analyze`` (systemd 252):
   * ``verify`` parses each unit with systemd's own parser and loads it, with its dependency
     graph, in a throw-away test manager. It reports unknown sections/keys, bad values and
     specifiers, missing dependencies, and an ExecStart binary that is not executable. It runs
     with ``--root`` on a temp tree holding a copy of the Debian system units (so
     ``network-online.target`` etc. resolve), our unit file unchanged, and an executable stub
     at the ExecStart path (/opt/crowdfl/venv/bin/...). It does not start anything, so the
     sandbox's effect at run time (e.g. whether TensorFlow copes with the syscall filter) is
     not tested here.
   * ``security --offline=true`` scores the sandbox; each unit must stay at "OK" (<= 2.0).
   Warnings make ``verify`` print but still exit 0, so any output counts as a failure.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from tests.support.realparts import find_executable, require_real_part

UNIT_DIR = Path(__file__).resolve().parents[1] / "hardware" / "systemd"
ROLES = ("agent", "edge", "coordinator")
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
MAX_EXPOSURE = 20  # systemd-analyze scale x10: 2.0 is the top of "OK"

Directives = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Directives:
    """section -> key -> values in order (units repeat keys, so configparser does not fit)."""
    out: Directives = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out[section][key.strip()].append(value.strip())
    return out


def unit_path(role: str) -> Path:
    return UNIT_DIR / f"crowdfl-{role}.service"


def exec_binary(role: str) -> str:
    return parse_unit(unit_path(role))["Service"]["ExecStart"][0].split()[0]


# --- static ------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_unit_declares_the_hardening_it_promises(role: str) -> None:
    unit = parse_unit(unit_path(role))
    svc, meta = unit["Service"], unit["Unit"]

    def one(key: str) -> str:
        assert len(svc[key]) == 1, f"{key}: {svc[key]}"
        return svc[key][0]

    # The servers' configs (which may hold secrets) sit in a root-only /etc/crowdfl and reach the
    # service as a systemd credential; the agent's holds no secret (its MQTT password is a credential).
    config = f"/etc/crowdfl/{role}.toml" if role == "agent" else f"%d/{role}.toml"
    assert (
        one("ExecStart")
        == f"/opt/crowdfl/venv/bin/crowdfl-{role} --config {config} {'serve' if role == 'coordinator' else 'run'}"
    )
    assert f"CROWDFL_CONFIG={config}" in " ".join(svc["Environment"]).split()
    assert one("DynamicUser") == "yes"
    assert one("StateDirectory") == f"crowdfl-{role}"
    assert one("ConfigurationDirectory") == "crowdfl"
    if role != "agent":
        assert one("ConfigurationDirectoryMode") == "0700"
        creds = dict(c.split(":", 1) for c in svc["LoadCredential"])
        assert creds[f"{role}.toml"] == f"/etc/crowdfl/{role}.toml"
        secrets = {"coordinator": {"admin-token", "database-url", "chain-key", "mqtt-password"}, "edge": {"database-url", "mqtt-password"}}[role]
        # optional secrets: credential names searched in /etc/credstore (no absolute path that must exist)
        assert {k for k, v in creds.items() if not v.startswith("/")} == secrets
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "Restart": "on-failure",
        "StandardOutput": "journal",
        "StandardError": "journal",
    }.items():
        assert one(key) == value, key
    assert "@system-service" in svc["SystemCallFilter"]
    assert re.fullmatch(r"\d+s", one("RestartSec"))
    assert re.fullmatch(r"\d+s", one("TimeoutStopSec"))
    assert meta["StartLimitIntervalSec"] and meta["StartLimitBurst"]
    # No sd_notify support yet: no notify type, no watchdog that would kill a healthy service.
    assert one("Type") == "exec"
    assert "WatchdogSec" not in svc
    if role == "agent":
        # Sensors: host /dev, but only the allowed device classes.
        assert one("PrivateDevices") == "no"
        assert one("DevicePolicy") == "closed"
        assert svc["DeviceAllow"]
    else:
        assert one("PrivateDevices") == "yes"


# --- systemd-analyze ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def analyze() -> str:
    exe = find_executable("systemd-analyze")
    require_real_part(
        "systemd-analyze",
        exe is not None,
        "systemd-analyze not found (apt-get install systemd; see .ci/install-system.sh)",
    )
    assert exe is not None
    return exe


@pytest.fixture(scope="module")
def unit_root(analyze: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    system_units = next(
        (d for d in SYSTEM_UNIT_DIRS if (d / "multi-user.target").exists()), None
    )
    require_real_part(
        "systemd system units",
        system_units is not None,
        f"none of {[str(d) for d in SYSTEM_UNIT_DIRS]} holds multi-user.target",
    )
    assert system_units is not None
    root = tmp_path_factory.mktemp("systemd-root")
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for role in ROLES:
        shutil.copy2(unit_path(role), root / "etc/systemd/system")
        stub = root / exec_binary(role).lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return root


def run_analyze(analyze: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze, *args], check=False, capture_output=True, text=True, timeout=60
    )


@pytest.mark.realpart
@pytest.mark.parametrize("role", ROLES)
def test_systemd_analyze_verify(analyze: str, unit_root: Path, role: str) -> None:
    result = run_analyze(
        analyze, "verify", "--man=no", f"--root={unit_root}", f"crowdfl-{role}.service"
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and output == "", output


@pytest.mark.realpart
@pytest.mark.parametrize("role", ROLES)
def test_systemd_analyze_security_exposure(
    analyze: str, unit_root: Path, role: str
) -> None:
    result = run_analyze(
        analyze,
        "security",
        "--offline=true",
        f"--threshold={MAX_EXPOSURE}",
        f"--root={unit_root}",
        f"crowdfl-{role}.service",
    )
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert result.returncode == 0 and level, result.stdout + result.stderr
    assert float(level.group(1)) * 10 <= MAX_EXPOSURE


@pytest.mark.realpart
def test_verify_reports_mistakes(analyze: str, unit_root: Path) -> None:
    """The checker is alive: a typo'd key and a missing binary are reported."""
    broken = (
        unit_path("agent").read_text().replace("ProtectHome=yes", "ProtectHomee=yes")
    )
    broken = broken.replace(
        "/opt/crowdfl/venv/bin/crowdfl-agent", "/opt/crowdfl/venv/bin/missing"
    )
    (unit_root / "etc/systemd/system/crowdfl-broken.service").write_text(broken)
    result = run_analyze(
        analyze, "verify", "--man=no", f"--root={unit_root}", "crowdfl-broken.service"
    )
    output = result.stdout + result.stderr
    assert "Unknown key 'ProtectHomee'" in output, output
    assert "is not executable" in output, output
    assert result.returncode != 0
