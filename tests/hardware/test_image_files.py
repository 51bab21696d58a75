"""The image's source files, checked without building it (fast)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.config import load

IMAGE = Path(__file__).resolve().parents[2] / "hardware" / "image"


def test_manufacturer_template_is_a_valid_agent_config() -> None:
    cfg = load(IMAGE / "crowdfl.toml.example")
    assert cfg.mqtt.tls and cfg.mqtt.ca_file == Path("/etc/crowdfl/ca.crt")
    assert cfg.state_dir == Path("/var/lib/crowdfl-agent")  # where the unit's StateDirectory is


@pytest.mark.parametrize("script", ["build.sh", "base.sh", "mkinitrd.sh", "initramfs-init",
                                    "overlay/opt/crowdfl/bin/crowdfl-firstboot", "overlay/opt/crowdfl/bin/crowdfl-health"])
def test_scripts_parse(script: str) -> None:
    path = IMAGE / script
    shell = "sh" if path.read_text().startswith(("#!/bin/sh", "#!/bin/busybox")) else "bash"
    subprocess.run([shell, "-n", str(path)], check=True)
    if script.startswith("overlay/opt"):
        assert path.stat().st_mode & 0o111, f"{script} is not executable"
